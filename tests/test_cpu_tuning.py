"""Small-CPU settings for vLLM (`vgs.cpu_tuning`): queue readers sleep instead of spinning."""

from __future__ import annotations

from vgs import cpu_tuning


def test_queue_readers_sleep_instead_of_spinning(monkeypatch, tmp_path):
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setattr(SpinCondition, "__init__", SpinCondition.__init__)  # restored after the test
    monkeypatch.setattr(SpinCondition, "_vgs_no_busy_wait", False, raising=False)
    monkeypatch.setenv("VGS_CPU_BUSY_WAIT", "0")
    monkeypatch.setattr(cpu_tuning, "small_cpu", lambda: True)
    ctx = zmq.Context()
    try:
        addr = f"ipc://{tmp_path}/notify"
        writer = SpinCondition(is_reader=False, context=ctx, notify_address=addr)
        spinning = SpinCondition(is_reader=True, context=ctx, notify_address=addr)
        assert spinning.busy_loop_s == 1  # vLLM's default
        cpu_tuning.no_busy_wait()
        cpu_tuning.no_busy_wait()  # idempotent
        reader = SpinCondition(is_reader=True, context=ctx, notify_address=addr)
        assert reader.busy_loop_s == 0
        for s in (writer.local_notify_socket, spinning.local_notify_socket, reader.local_notify_socket,
                  spinning.read_cancel_socket, spinning.write_cancel_socket, reader.read_cancel_socket,
                  reader.write_cancel_socket):
            s.close(linger=0)
    finally:
        ctx.term()
