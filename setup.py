"""Installable package: the same code runs locally, on Dataflow workers
(--setup_file ./setup.py) and in the flex-template image."""

from pathlib import Path

from setuptools import find_packages, setup

REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="beam-windowed-features",
    version="0.1.0",
    description="Point-in-time windowed features for training (batch) and serving (streaming) with Apache Beam",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["beam_app", "beam_app.*", "transforms", "transforms.*", "models", "models.*"]),
    package_data={"transforms": ["specs/*.yaml"], "beam_app": ["data/*.csv", "data/README.md"]},
    install_requires=REQUIREMENTS,
)
