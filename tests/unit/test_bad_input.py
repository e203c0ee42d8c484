"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing attached."""

from __future__ import annotations

import subprocess

from support.qprobe import assert_clean_error, qprobe


def test_pid_absent():
    assert_clean_error(qprobe("watch", "999999999"), "no such process")


def test_pid_not_qemu():
    with subprocess.Popen(["sleep", "30"]) as p:
        try:
            assert_clean_error(qprobe("watch", str(p.pid)), "not a QEMU process")
        finally:
            p.kill()


def test_pid_not_a_number():
    r = qprobe("watch", "vm1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a valid integer" in r.stderr


def test_bad_duration():
    r = qprobe("watch", "1", "--duration", "-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_symbols_non_elf(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    assert_clean_error(qprobe("symbols", str(f)), "not an ELF file")


def test_symbols_missing_file(tmp_path):
    assert_clean_error(qprobe("symbols", str(tmp_path / "nope")), "no such file")


def test_symbols_needs_one_target():
    r = qprobe("symbols")
    assert r.returncode == 2 and "give either BINARY or --pid PID" in r.stderr
