"""Decoders: numbers from the kernel -> the names of the contract (root-free)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from qtrace_bpf.contract import abi, decoders, maps
from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.contract.events import Decoder, render
from qtrace_bpf.contract.kvm_ioctls import BY_NAME, IOCTLS

CATALOG = load_catalog()
NUMBERS = sorted(IOCTLS)


def decoder() -> Decoder:
    return Decoder(CATALOG, lambda vm, pid: f"vm{vm}-{pid}", lambda _vm: {})


def event(**fields) -> SimpleNamespace:
    base = dict(ts=0, tgid=1, tid=1, vm=1, kind=abi.K_STATE_WRITE, id=0, vcpu=-1, phase=0,
                cause=0, level=0, fd=0, ret=0, arg1=0, arg2=0, have=0, known=0, changed=0,
                vals=[0] * abi.NVALS)
    base.update(fields)
    return SimpleNamespace(**base)


def test_sregs2_write_in_reset():
    ev = decoder().decode(event(id=BY_NAME["KVM_SET_SREGS2"].number, vcpu=1,
                                phase=abi.PH_RESET, cause=abi.CAUSE_HOST_QMP_SYSTEM_RESET,
                                level=2, have=1, known=1, changed=0,
                                vals=[0xFEE00800, 0, 0, 0]))
    assert ev["event"] == "KVM_SET_SREGS2" and ev["vcpu"] == 1 and ev["vm"] == "vm1-1"
    assert ev["phase"] == "reset" and ev["cause"] == "host-qmp-system-reset"
    assert ev["level"] == 2
    assert ev["apic_base"] == "0xfee00800" and ev["apic_base_changed"] is False
    assert "apic_base=0xfee00800 unchanged" in render(ev)


def test_unknown_numbers_keep_placeholders_and_are_counted():
    before = dict(decoders.DECODE_ERRORS)
    assert decoders.phase(7) == "phase-7"
    assert decoders.cause(12) == "cause-12"
    assert decoders.ioctl(0x1234AEFF) == "KVM_IOCTL_0x1234aeff"
    for field in ("phase", "cause", "ioctl"):
        assert decoders.DECODE_ERRORS[field] == before.get(field, 0) + 1


def test_reset_rows_split_the_followup_flag():
    key = SimpleNamespace(vm=5, cause=abi.CAUSE_GUEST_RESET | abi.FOLLOWUP_FLAG)
    ((vm, row, n),) = maps.RESETS.rows([(key, 3)], CATALOG)
    assert (vm, row, n) == (5, {"cause": "guest-reset", "following_host": True}, 3)


@settings(max_examples=300, deadline=None)
@given(cmd=st.sampled_from(NUMBERS), vcpu=st.integers(-1, 511),
       phase=st.integers(0, len(abi.PHASES) - 1), cause=st.integers(0, abi.NCAUSES - 1),
       level=st.integers(0, 3), have=st.integers(0, 2 ** abi.NVALS - 1),
       known=st.integers(0, 2 ** abi.NVALS - 1), changed=st.integers(0, 2 ** abi.NVALS - 1),
       vals=st.lists(st.integers(0, 2 ** 64 - 1), min_size=abi.NVALS, max_size=abi.NVALS),
       ret=st.integers(-4095, 64), arg1=st.integers(0, 1023))
def test_state_write_decoding_keeps_every_field(cmd, vcpu, phase, cause, level, have, known,
                                                changed, vals, ret, arg1):
    """Whatever the kernel sends, each field lands under its name with its value."""
    raw = event(id=cmd, vcpu=vcpu, phase=phase, cause=cause, level=level, have=have,
                known=known, changed=changed, vals=vals, ret=ret, arg1=arg1)
    ev = decoder().decode(raw)
    name = IOCTLS[cmd].name
    assert ev["kind"] == "state_write" and ev["event"] == name and ev["ioctl"] == f"{cmd:#x}"
    assert ev["phase"] == abi.PHASES[phase]
    assert ev.get("cause") == (abi.CAUSES[cause] if phase == abi.PH_RESET else None)
    assert ev.get("level") == (level or None)
    assert ev.get("error") == (True if ret < 0 else None)
    if name == "KVM_CREATE_VCPU":
        assert ev["vcpu"] == arg1
    else:
        assert ev["vcpu"] == (vcpu if vcpu >= 0 else None)
    for i, value in enumerate(abi.VALUES):
        if have & (1 << i):
            shown = ev[value]
            assert (shown if value == "tsc_khz" else int(shown, 16)) == vals[i]
            assert ev[f"{value}_changed"] == (bool(changed & (1 << i))
                                              if known & (1 << i) else None)
        else:
            assert value not in ev and f"{value}_changed" not in ev
    render(ev)  # every decodable event renders


# Registers as a handler reads them; ARG_UNKNOWN in both is what a blind handler (a GCC
# clone's or an inlined instance's entry) sends: "no argument was read".
ARG = st.one_of(st.just(abi.ARG_UNKNOWN), st.integers(0, 2 ** 64 - 1))


@settings(max_examples=300, deadline=None)
@given(slot=st.integers(0, len(CATALOG.probes) - 1), arg1=ARG, arg2=ARG,
       phase=st.integers(0, len(abi.PHASES) - 1))
@example(slot=CATALOG.by_event("system_reset").slot, arg1=abi.ARG_UNKNOWN,
         arg2=abi.ARG_UNKNOWN, phase=abi.PH_RESET)
@example(slot=CATALOG.by_event("put_registers").slot, arg1=abi.ARG_UNKNOWN,
         arg2=abi.ARG_UNKNOWN, phase=abi.PH_RUNTIME)
@example(slot=CATALOG.by_event("put_registers").slot, arg1=5, arg2=abi.ARG_UNKNOWN,
         phase=abi.PH_RUNTIME)
def test_lifecycle_decoding_follows_the_catalog(slot, arg1, arg2, phase):
    probe = CATALOG.by_slot(slot)
    ev = decoder().decode(event(kind=abi.K_LIFECYCLE, id=slot, arg1=arg1, arg2=arg2,
                                phase=phase))
    assert ev["kind"] == "lifecycle" and ev["event"] == probe.event
    assert ev["function"] == probe.functions[0]
    blind = arg1 == arg2 == abi.ARG_UNKNOWN
    if blind:
        assert "level" not in ev and "value" not in ev, ev
        assert ev.get("args") == ("unknown" if probe.arg1 or probe.arg2 else None)
        if probe.arg1 == "shutdown_cause":
            assert ev["cause"] == "unknown"
    else:
        assert "args" not in ev
        if probe.arg2 == "level":
            assert ev["level"] == arg2
        if probe.arg1 == "shutdown_cause":
            assert ev["cause"] == decoders.cause(arg1)


def test_unexpected_writes_and_step_ends_are_marked():
    """A catalog [[expect]] rule marks a KVM_SET_TSC_KHZ outside boot/hotplug/migration; a
    failed call is not a write and is not marked; a step end shows its duration."""
    tsc = BY_NAME["KVM_SET_TSC_KHZ"].number
    d = decoder()
    runtime = d.decode(event(id=tsc, phase=abi.PH_RUNTIME, vcpu=0))
    assert runtime["unexpected"] is True and "UNEXPECTED in runtime" in render(runtime)
    for phase in (abi.PH_BOOT, abi.PH_HOTPLUG, abi.PH_MIGRATION):
        assert "unexpected" not in d.decode(event(id=tsc, phase=phase, vcpu=0))
    assert "unexpected" in d.decode(event(id=tsc, phase=abi.PH_RESET, vcpu=0))
    assert "unexpected" not in d.decode(event(id=tsc, phase=abi.PH_RUNTIME, ret=-22))
    assert "unexpected" not in d.decode(event(id=BY_NAME["KVM_SET_LAPIC"].number,
                                              phase=abi.PH_RUNTIME))
    step = d.decode(event(kind=abi.K_STEP, id=abi.S_HOTPLUG, phase=abi.PH_HOTPLUG,
                          arg1=1_234_567))
    assert (step["kind"], step["step"], step["seconds"]) == ("step", "hotplug", 0.001235)
    assert "[hotplug took]" in render(step) and "1.235 ms" in render(step)


def test_catalog_expect_rules_are_checked():
    import pytest

    from qtrace_bpf.contract.catalog import parse_catalog

    good = '[[expect]]\nioctl = "KVM_SET_TSC_KHZ"\nphases = ["boot"]\nsource = "kvm.c"\n'
    assert parse_catalog(good).unexpected("KVM_SET_TSC_KHZ", "reset")
    for bad, why in ((good.replace("KVM_SET_TSC_KHZ", "KVM_RUN"), "state-writing"),
                     (good.replace('"boot"', '"boot", "later"'), "phases"),
                     (good.replace('source = "kvm.c"\n', ""), "QEMU code"),
                     (good + "why = 1\n", "unknown key")):
        with pytest.raises(ValueError, match=why):
            parse_catalog(bad)


def test_watch_filter():
    import pytest

    from qtrace_bpf.commands.watch_filter import EventFilter
    from qtrace_bpf.errors import QtraceError

    f = EventFilter.parse((1,), ("set_tsc_khz",), ())
    write = {"kind": "state_write", "event": "KVM_SET_TSC_KHZ", "vcpu": 1, "phase": "boot"}
    assert f(write) and not f({**write, "vcpu": 0})
    assert not f({**write, "event": "KVM_SET_LAPIC"})
    assert not f({"kind": "lifecycle", "event": "system_reset", "vcpu": None, "phase": "reset"})
    by_phase = EventFilter.parse((), (), ("reset",))
    assert by_phase({"kind": "lifecycle", "event": "x", "vcpu": None, "phase": "reset"})
    assert not by_phase(write)
    assert EventFilter.parse((), (), ())(write)
    with pytest.raises(QtraceError, match="state-writing"):
        EventFilter.parse((), ("KVM_RUN",), ())
    with pytest.raises(QtraceError, match="one of boot"):
        EventFilter.parse((), (), ("later",))
