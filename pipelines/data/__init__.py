"""The data: archives fetched and extracted, raw trees read, Parquet shards built and read, the Ray Data stream, the synthetic mirror."""
