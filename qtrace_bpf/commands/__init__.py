"""One module per qprobe command, and what they share.

watch (with watch_filter), daemon (with daemon_flags, config and service: signals and
sd_notify), symbols, doctor, demo (with demo_vm, a throwaway QEMU over QMP).  cli.py
registers them.

May import: anything below, and the exporters (the daemon serves them).
"""
