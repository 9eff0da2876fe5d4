"""Benchmarks of pipe_rpc against raw pipes and peers; see README.md."""
