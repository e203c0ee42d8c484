"""What qtrace traces, as data: the lifecycle catalog and the BPF C sources."""
