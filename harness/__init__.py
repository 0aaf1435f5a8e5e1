"""Process harness: real etcd, PostgreSQL, provider and replicas on loopback.

Used by the test suite, `make run` and the benchmarks; never by the service itself.
"""
