"""`finechat bench`: measurements that back the numbers in docs/benchmarks.md (one module per benchmark)."""
