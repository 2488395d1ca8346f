"""Batched TFRecord writes (transforms/tfrecord_files.py): every record of
every list, in files tf.data's GZIP reader reads back, at any gzip level;
a smaller level costs size, never content."""

import glob
import os

import apache_beam as beam
import pytest
import tensorflow as tf

from transforms.tfrecord_files import WriteTFRecordBatches

BATCHES = [[f"record {b}-{i}".encode() * (i % 7 + 1) for i in range(b * 37 % 200)] for b in range(12)]


def _write(tmp_path, level):
    prefix = str(tmp_path / f"level{level}" / "examples")
    with beam.Pipeline() as pipeline:
        pipeline | beam.Create(BATCHES) | WriteTFRecordBatches(prefix, gzip_level=level)
    return sorted(glob.glob(prefix + "-*.tfrecord.gz"))


@pytest.mark.parametrize("level", [1, 6, 9])
def test_every_record_is_read_back_by_tf_data(tmp_path, level):
    files = _write(tmp_path, level)
    assert files
    read = [record.numpy() for record in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert sorted(read) == sorted(record for batch in BATCHES for record in batch)


def test_a_faster_level_writes_larger_files_of_the_same_records(tmp_path):
    fast, small = _write(tmp_path, 1), _write(tmp_path, 9)
    assert sum(map(os.path.getsize, fast)) > sum(map(os.path.getsize, small))


@pytest.mark.parametrize("level", [0, 10])
def test_a_level_outside_1_to_9_is_refused(level):
    with pytest.raises(ValueError, match="gzip_level must be 1 to 9"):
        WriteTFRecordBatches("/tmp/never", gzip_level=level)
