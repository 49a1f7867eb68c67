"""NcclCommunicator at world size 1 on one GPU: unique ids, the four collectives and all-to-all
(qgZ's hops, bitwise the CPU path), grouped calls,
byte counters, abort, async errors, teardown, argument checks and the loaded NCCL version; the
Python NcclCommunicator's grouped all-gather and its exit. Skips without a GPU.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zeroshard
from zeroshard import _core
from zeroshard.env import nccl_library_path

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _core.gpu.built_with_cuda()
         and _core.gpu.device_count() > 0),
    reason="needs the CUDA variant of zeroshard and a CUDA GPU")

gpu = _core.gpu
F32, BF16 = 0, 1


def gpu_dtype(dtype: torch.dtype) -> int:
    from zeroshard._tensors import dtype_code
    return dtype_code(dtype)


@pytest.fixture(scope="module")
def comm():
    gpu.load_nccl(nccl_library_path())
    c = gpu.NcclCommunicator(gpu.nccl_unique_id(), 0, 1, 0, 60.0)
    yield c
    del c


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _mapped_nccl_libraries() -> list:
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps
                       if "libnccl.so" in line and line.split()[-1].startswith("/")})


def _torch_nccl_code():
    """torch's NCCL version as 22809, or None. torch.cuda.nccl.version() is a tuple of 3 or 4
    fields (a suffix in newer torch), an int in old ones."""
    try:
        v = torch.cuda.nccl.version()
    except Exception:
        return None
    if isinstance(v, int):
        return v if v >= 10000 else None
    major, minor, patch = (int(x) for x in tuple(v)[:3])
    return major * 10000 + minor * 100 + patch


def test_versions():
    gpu.load_nccl(nccl_library_path())
    assert gpu.nccl_loaded()
    loaded = gpu.nccl_version_loaded()
    assert loaded >= 21800
    assert gpu.nccl_version_linked() >= 21800
    # The core reports the library really in this process: one NCCL, asked directly.
    libraries = _mapped_nccl_libraries()
    assert len(libraries) == 1, f"more than one NCCL in the process: {libraries}"
    version = ctypes.c_int(0)
    assert ctypes.CDLL(libraries[0]).ncclGetVersion(ctypes.byref(version)) == 0
    assert loaded == version.value
    torch_code = _torch_nccl_code()
    if torch_code is not None:  # torch reports the runtime version of the NCCL it uses: ours
        assert torch_code == loaded, (torch.cuda.nccl.version(), loaded)


def test_unique_ids_are_fresh():
    a, b = gpu.nccl_unique_id(), gpu.nccl_unique_id()
    assert isinstance(a, bytes) and len(a) == 128 and a != b


def test_collectives_world_one(comm):
    assert (comm.rank, comm.world_size) == (0, 1)
    n = 1003
    x = torch.randn(n, device="cuda")
    out = torch.empty_like(x)
    for op in (gpu.ReduceOp.sum, gpu.ReduceOp.avg, gpu.ReduceOp.max):
        out.zero_()
        comm.all_reduce(x.data_ptr(), out.data_ptr(), n, F32, op, stream())
        comm.synchronize(stream())
        assert torch.equal(out, x)
    out.zero_()
    comm.reduce_scatter(x.data_ptr(), out.data_ptr(), n, F32, gpu.ReduceOp.sum, stream())
    comm.synchronize(stream())
    assert torch.equal(out, x)
    xb = x.bfloat16()
    outb = torch.zeros_like(xb)
    comm.all_gather(xb.data_ptr(), outb.data_ptr(), n, BF16, stream())
    comm.synchronize(stream())
    assert torch.equal(outb, xb)
    out.zero_()
    comm.broadcast(x.data_ptr(), out.data_ptr(), n, F32, 0, stream())
    comm.synchronize(stream())
    assert torch.equal(out, x)
    # In place, as the reducer uses it.
    y = x.clone()
    comm.all_reduce(y.data_ptr(), y.data_ptr(), n, F32, gpu.ReduceOp.sum, stream())
    comm.synchronize(stream())
    assert torch.equal(y, x)


def test_grouped_calls_and_counters(comm):
    comm.reset_counters()
    a, b = torch.arange(64, dtype=torch.float32, device="cuda"), torch.ones(17, device="cuda")
    ra, rb = torch.empty_like(a), torch.empty_like(b)
    comm.group_start()
    comm.all_reduce(a.data_ptr(), ra.data_ptr(), 64, F32, gpu.ReduceOp.sum, stream())
    comm.all_gather(b.data_ptr(), rb.data_ptr(), 17, F32, stream())
    comm.group_end()
    comm.synchronize(stream())
    assert torch.equal(ra, a) and torch.equal(rb, b)
    k = comm.counters()
    assert k["all_reduce"] == {"calls": 1, "payload_bytes": 256,
                               "bytes_sent": gpu.ring_bytes_sent("all_reduce", 256, 1)}
    assert k["all_gather"]["calls"] == 1 and k["all_gather"]["payload_bytes"] == 68
    assert k["reduce_scatter"]["calls"] == 0 and k["broadcast"]["calls"] == 0
    assert k["all_reduce"]["bytes_sent"] == 0  # one rank sends nothing
    comm.reset_counters()
    assert all(row["calls"] == 0 for row in comm.counters().values())


def test_all_to_all_world_one(comm):
    """ncclSend/ncclRecv to itself in one group: the block comes back; counted as a
    reduce-scatter of the sent bytes (qgZ's hops)."""
    comm.reset_counters()
    x = torch.randn(1003, device="cuda").half()
    out = torch.zeros_like(x)
    comm.all_to_all(x.data_ptr(), out.data_ptr(), x.numel(), gpu_dtype(torch.float16), stream())
    comm.synchronize(stream())
    assert torch.equal(out, x)
    k = comm.counters()["reduce_scatter"]
    assert k["calls"] == 1 and k["payload_bytes"] == 2 * 1003


def test_quantized_reduce_scatter_on_nccl_is_bitwise_the_cpu_one():
    """qgZ's two hops through the Python NcclCommunicator (world size 1 each) on the GPU, and
    through a LocalCommunicator on the CPU: the same quantize / all-to-all / dequantize-add
    kernels on the same values give the same bits."""
    from zeroshard.comm.communicator import LocalCommunicator
    from zeroshard.comm.nccl_communicator import NcclCommunicator
    from zeroshard.sharding.quantized_reduce import QuantizedReduceScatter
    torch.manual_seed(0)
    full = torch.randn(5 * 2048 + 77)
    results = []
    for bits in (8, 4):
        out = {}
        for device in ("cpu", "cuda"):
            if device == "cuda":
                node = NcclCommunicator(None, torch.device("cuda", 0), 60.0)
                cross = NcclCommunicator(None, torch.device("cuda", 0), 60.0)
            else:
                node, cross = LocalCommunicator(), LocalCommunicator()
            part = torch.zeros(full.numel(), device=device)
            QuantizedReduceScatter(node, cross, bits).reduce_scatter(part,
                                                                     full.to(device)).wait()
            out[device] = part.cpu()
            for c in (node, cross):
                if hasattr(c, "close"):
                    c.close()
        assert torch.equal(out["cpu"], out["cuda"]), bits
        assert not torch.equal(out["cpu"], full)  # quantized: not the input itself
        results.append(out["cpu"])
    assert (results[0] - full).abs().max() < (results[1] - full).abs().max()


def test_group_end_without_start(comm):
    with pytest.raises(ValueError, match="group_start"):
        comm.group_end()


def test_argument_checks():
    uid = gpu.nccl_unique_id()
    with pytest.raises(ValueError, match="unique_id"):
        gpu.NcclCommunicator(b"short", 0, 1, 0, 10.0)
    with pytest.raises(ValueError, match="rank"):
        gpu.NcclCommunicator(uid, 1, 1, 0, 10.0)
    with pytest.raises(ValueError, match="device"):
        gpu.NcclCommunicator(uid, 0, 1, gpu.device_count(), 10.0)
    with pytest.raises(ValueError, match="timeout_s"):
        gpu.NcclCommunicator(uid, 0, 1, 0, 0.0)


def test_timeout_property_abort_and_async_error():
    gpu.load_nccl(nccl_library_path())
    c = gpu.NcclCommunicator(gpu.nccl_unique_id(), 0, 1, 0, 30.0)
    assert c.timeout_s == 30.0 and c.device == 0
    c.timeout_s = 5.0
    assert c.timeout_s == 5.0
    with pytest.raises(ValueError, match="timeout_s"):
        c.timeout_s = -1.0
    assert c.async_error() is None
    assert not c.aborted
    c.abort()
    assert c.aborted
    assert c.async_error() is None  # nothing left to ask
    x = torch.ones(8, device="cuda")
    with pytest.raises(zeroshard.CoreError, match="aborted"):
        c.all_reduce(x.data_ptr(), x.data_ptr(), 8, F32, gpu.ReduceOp.sum, stream())
    c.abort()  # idempotent
    c.destroy()  # an aborted communicator is never destroyed again


def test_destroy_finalizes_and_later_calls_say_so():
    gpu.load_nccl(nccl_library_path())
    c = gpu.NcclCommunicator(gpu.nccl_unique_id(), 0, 1, 0, 30.0)
    x = torch.ones(1 << 20, device="cuda")
    c.all_reduce(x.data_ptr(), x.data_ptr(), x.numel(), F32, gpu.ReduceOp.sum, stream())
    c.destroy()  # finalize waits for the queued all_reduce, then destroy
    assert not c.aborted
    with pytest.raises(zeroshard.CoreError, match="destroyed"):
        c.all_reduce(x.data_ptr(), x.data_ptr(), 8, F32, gpu.ReduceOp.sum, stream())
    c.destroy()  # idempotent


def test_python_communicator_grouped_all_gather_and_clean_exit():
    # World size 1 without torch.distributed; in a child so that its exit (the communicator's
    # atexit teardown: watchdog closed, ncclCommFinalize + ncclCommDestroy) is checked too.
    code = textwrap.dedent("""
        import torch, zeroshard
        from zeroshard.comm.nccl_communicator import NcclCommunicator
        comm = NcclCommunicator(None, torch.device("cuda", 0), 60.0)
        fulls = [torch.zeros(n, device="cuda", dtype=d)
                 for n, d in ((7, torch.float32), (13, torch.bfloat16))]
        for f in fulls:
            f.copy_(torch.arange(f.numel(), dtype=f.dtype))
        work = comm.all_gather_buckets([(f, f) for f in fulls])
        work.wait()
        torch.cuda.synchronize()
        assert all(torch.equal(f, torch.arange(f.numel(), dtype=f.dtype, device="cuda"))
                   for f in fulls)
        assert comm.stats.calls["all_gather"] == 2
        assert comm._comm.counters()["all_gather"]["calls"] == 2
        comm.all_reduce(fulls[0]).wait()
        print("OK", comm.device)
    """)
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0 and "OK cuda:0" in done.stdout, done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_communicator_on_a_device_that_is_not_current():
    # A script that never calls torch.cuda.set_device: the parameters' device decides.
    from zeroshard.comm.nccl_communicator import NcclCommunicator

    assert torch.cuda.current_device() == 0
    comm = NcclCommunicator(None, torch.device("cuda", 1), 60.0)
    try:
        assert comm._comm.device == 1 and comm.stream.device == torch.device("cuda", 1)
        x = torch.arange(11.0, device="cuda:1")
        with torch.cuda.device(1):
            comm.all_reduce(x).wait()
            torch.cuda.synchronize(1)
        assert torch.equal(x, torch.arange(11.0, device="cuda:1"))
        assert torch.cuda.current_device() == 0
    finally:
        comm.close()


def test_init_times_out_when_peers_never_come():
    # world_size 2 with only rank 0 present: init must raise within its timeout, not hang, and
    # the process must still exit cleanly with the abandoned init thread. In a child process so
    # that a hang fails this test instead of stalling the suite.
    code = textwrap.dedent("""
        import time, torch, zeroshard
        from zeroshard import _core
        from zeroshard.env import nccl_library_path
        _core.gpu.load_nccl(nccl_library_path())
        start = time.monotonic()
        try:
            _core.gpu.NcclCommunicator(_core.gpu.nccl_unique_id(), 0, 2, 0, 3.0)
            print("NO ERROR")
        except zeroshard.CoreError as err:
            print("CoreError:", err)
        print("waited", round(time.monotonic() - start))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert "CoreError:" in done.stdout, done.stdout + done.stderr
    assert "timeout_s" in done.stdout and "rank 0" in done.stdout
    waited = int(done.stdout.split("waited")[-1])
    assert waited <= 10, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
