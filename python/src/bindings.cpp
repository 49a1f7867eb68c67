// zeroshard._core: thin pybind11 bindings. Pointers and streams arrive as integers (taken from
// torch tensors by zeroshard/ops.py), so this file knows nothing of torch. Long-running calls
// release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "zeroshard/build_info.hpp"
#include "zeroshard/cpu_kernels.hpp"
#include "zeroshard/cpu_runtime.hpp"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"
#include "zeroshard/layout.hpp"
#include "zeroshard/nccl_communicator.hpp"

namespace py = pybind11;
namespace zs = zeroshard;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

zs::DType dtype(int code) {
  ZS_REQUIRE(zs::is_valid_dtype(code), "unknown dtype code " + std::to_string(code));
  return static_cast<zs::DType>(code);
}

void bind_configs(py::module_& m) {
  py::class_<zs::AdamConfig>(m, "AdamConfig")
      .def(py::init<>())
      .def_readwrite("lr", &zs::AdamConfig::lr)
      .def_readwrite("beta1", &zs::AdamConfig::beta1)
      .def_readwrite("beta2", &zs::AdamConfig::beta2)
      .def_readwrite("eps", &zs::AdamConfig::eps)
      .def_readwrite("weight_decay", &zs::AdamConfig::weight_decay)
      .def_readwrite("step", &zs::AdamConfig::step)
      .def_readwrite("decoupled", &zs::AdamConfig::decoupled)
      .def_readwrite("amsgrad", &zs::AdamConfig::amsgrad)
      .def_readwrite("maximize", &zs::AdamConfig::maximize)
      .def_readwrite("grad_scale", &zs::AdamConfig::grad_scale)
      .def_readwrite("check_finite", &zs::AdamConfig::check_finite)
      .def("validate", [](const zs::AdamConfig& c) { zs::validate(c); });
  py::class_<zs::SgdConfig>(m, "SgdConfig")
      .def(py::init<>())
      .def_readwrite("lr", &zs::SgdConfig::lr)
      .def_readwrite("momentum", &zs::SgdConfig::momentum)
      .def_readwrite("dampening", &zs::SgdConfig::dampening)
      .def_readwrite("weight_decay", &zs::SgdConfig::weight_decay)
      .def_readwrite("nesterov", &zs::SgdConfig::nesterov)
      .def_readwrite("first_step", &zs::SgdConfig::first_step)
      .def_readwrite("maximize", &zs::SgdConfig::maximize)
      .def_readwrite("grad_scale", &zs::SgdConfig::grad_scale)
      .def_readwrite("check_finite", &zs::SgdConfig::check_finite)
      .def("validate", [](const zs::SgdConfig& c) { zs::validate(c); });
}

void bind_layout(py::module_& m) {
  py::class_<zs::Range>(m, "Range")
      .def(py::init([](int64_t s, int64_t e) { return zs::Range{s, e}; }), py::arg("start"),
           py::arg("end"))
      .def_readonly("start", &zs::Range::start)
      .def_readonly("end", &zs::Range::end)
      .def_property_readonly("size", &zs::Range::size)
      .def("intersect", &zs::Range::intersect)
      .def("__eq__", &zs::Range::operator==)
      .def("__repr__", [](const zs::Range& r) {
        return "Range(" + std::to_string(r.start) + ", " + std::to_string(r.end) + ")";
      });
  py::class_<zs::ShardPiece>(m, "ShardPiece")
      .def_readonly("param", &zs::ShardPiece::param)
      .def_readonly("bucket", &zs::ShardPiece::bucket)
      .def_readonly("param_range", &zs::ShardPiece::param_range)
      .def_readonly("shard_range", &zs::ShardPiece::shard_range)
      .def_readonly("buffer_range", &zs::ShardPiece::buffer_range);
  py::class_<zs::Layout>(m, "Layout")
      .def(py::init<std::vector<int64_t>, int, int64_t, int64_t>(), py::arg("numels"),
           py::arg("world_size"), py::arg("align_elems"), py::arg("bucket_elems"))
      .def_property_readonly("world_size", &zs::Layout::world_size)
      .def_property_readonly("align_elems", &zs::Layout::align_elems)
      .def_property_readonly("bucket_elems", &zs::Layout::bucket_elems)
      .def_property_readonly("num_params", &zs::Layout::num_params)
      .def_property_readonly("num_buckets", &zs::Layout::num_buckets)
      .def_property_readonly("buffer_numel", &zs::Layout::buffer_numel)
      .def_property_readonly("shard_numel", &zs::Layout::shard_numel)
      .def_property_readonly("param_ranges", &zs::Layout::param_ranges)
      .def_property_readonly("bucket_ranges", &zs::Layout::bucket_ranges)
      .def("bucket_slice", &zs::Layout::bucket_slice, py::arg("bucket"), py::arg("rank"))
      .def("bucket_slice_shard_offset", &zs::Layout::bucket_slice_shard_offset)
      .def("shard_ranges", &zs::Layout::shard_ranges, py::arg("rank"))
      .def("params_in_bucket", &zs::Layout::params_in_bucket)
      .def("bucket_of_buffer_index", &zs::Layout::bucket_of_buffer_index)
      .def("shard_pieces", &zs::Layout::shard_pieces, py::arg("rank"))
      .def("buffer_to_shard", &zs::Layout::buffer_to_shard)
      .def("shard_to_buffer", &zs::Layout::shard_to_buffer);
}

void bind_cpu(py::module_& m) {
  auto cpu = m.def_submodule("cpu", "CPU kernels over raw pointers");
  cpu.def(
      "adam_step",
      [](uintptr_t p, uintptr_t g, int gd, uintptr_t ea, uintptr_t eas, uintptr_t max_eas,
         uintptr_t copy, int cd, int64_t n, const zs::AdamConfig& cfg) {
        py::gil_scoped_release release;
        return zs::cpu::adam_step(ptr<float>(p), ptr<const void>(g), dtype(gd), ptr<float>(ea),
                                  ptr<float>(eas), ptr<float>(max_eas), ptr<void>(copy),
                                  dtype(cd), n, cfg);
      });
  cpu.def("sgd_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t buf, uintptr_t copy, int cd,
                         int64_t n, const zs::SgdConfig& cfg) {
    py::gil_scoped_release release;
    return zs::cpu::sgd_step(ptr<float>(p), ptr<const void>(g), dtype(gd), ptr<float>(buf),
                             ptr<void>(copy), dtype(cd), n, cfg);
  });
  cpu.def("l2_norm_sq", [](uintptr_t x, int d, int64_t n) {
    py::gil_scoped_release release;
    const auto r = zs::cpu::l2_norm_sq(ptr<const void>(x), dtype(d), n);
    return std::make_pair(r.sum_sq, r.nonfinite);
  });
  cpu.def("all_finite", [](uintptr_t x, int d, int64_t n) {
    py::gil_scoped_release release;
    return zs::cpu::all_finite(ptr<const void>(x), dtype(d), n);
  });
  cpu.def("scale", [](uintptr_t x, int d, int64_t n, float f) {
    py::gil_scoped_release release;
    zs::cpu::scale(ptr<void>(x), dtype(d), n, f);
  });
  cpu.def("cast", [](uintptr_t s, int sd, uintptr_t d, int dd, int64_t n) {
    py::gil_scoped_release release;
    zs::cpu::cast(ptr<const void>(s), dtype(sd), ptr<void>(d), dtype(dd), n);
  });
  cpu.def("quantized_bytes", &zs::cpu::quantized_bytes);
  cpu.def("quantized_blocks", &zs::cpu::quantized_blocks);
  cpu.def("quantize", [](uintptr_t x, int d, int64_t n, int bits, int64_t block, uintptr_t q,
                         uintptr_t scales) {
    py::gil_scoped_release release;
    zs::cpu::quantize(ptr<const void>(x), dtype(d), n, bits, block, ptr<int8_t>(q),
                      ptr<float>(scales));
  });
  cpu.def("dequantize", [](uintptr_t q, uintptr_t scales, int64_t n, int bits, int64_t block,
                           uintptr_t out, int d) {
    py::gil_scoped_release release;
    zs::cpu::dequantize(ptr<const int8_t>(q), ptr<const float>(scales), n, bits, block,
                        ptr<void>(out), dtype(d));
  });
  cpu.def("dequantize_add", [](uintptr_t q, uintptr_t scales, int64_t n, int bits,
                               int64_t block, uintptr_t acc) {
    py::gil_scoped_release release;
    zs::cpu::dequantize_add(ptr<const int8_t>(q), ptr<const float>(scales), n, bits, block,
                            ptr<float>(acc));
  });
  cpu.def("simd_level", [] { return zs::cpu::simd_level_name(zs::cpu::simd_level()); });
  cpu.def("detected_simd_level",
          [] { return zs::cpu::simd_level_name(zs::cpu::detected_simd_level()); });
  cpu.def("set_simd_level", [](const std::string& name) {
    for (auto l : {zs::cpu::SimdLevel::scalar, zs::cpu::SimdLevel::avx2,
                   zs::cpu::SimdLevel::avx512}) {
      if (name == zs::cpu::simd_level_name(l)) return zs::cpu::set_simd_level(l);
    }
    ZS_REQUIRE(false, "simd level must be scalar, avx2 or avx512, got '" + name + "'");
  });
  cpu.def("num_threads", &zs::cpu::num_threads);
  cpu.def("set_num_threads", &zs::cpu::set_num_threads);
}

void bind_gpu(py::module_& m) {
  auto gpu = m.def_submodule("gpu", "CUDA kernels and NCCL over raw pointers and streams");
  gpu.def("built_with_cuda", &zs::gpu::built_with_cuda);
  gpu.def("device_count", &zs::gpu::device_count);
  gpu.def("device_name", &zs::gpu::device_name);
  // Page-locking a multi-GB buffer takes seconds: the other Python threads (the landing
  // worker, the NCCL watchdog) go on meanwhile.
  gpu.def(
      "host_register",
      [](uintptr_t p, int64_t bytes) { zs::gpu::host_register(ptr<void>(p), bytes); },
      py::call_guard<py::gil_scoped_release>());
  gpu.def(
      "host_unregister", [](uintptr_t p) { zs::gpu::host_unregister(ptr<void>(p)); },
      py::call_guard<py::gil_scoped_release>());
  gpu.def("check_finite", [](uintptr_t x, int d, int64_t n, uintptr_t flag, uintptr_t s) {
    zs::gpu::check_finite(ptr<const void>(x), dtype(d), n, ptr<int32_t>(flag), ptr<void>(s));
  });
  gpu.def("adam_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t ea, uintptr_t eas,
                          uintptr_t max_eas, uintptr_t copy, int cd, int64_t n,
                          const zs::AdamConfig& cfg, uintptr_t flag, uintptr_t s) {
    zs::gpu::adam_step(ptr<float>(p), ptr<const void>(g), dtype(gd), ptr<float>(ea),
                       ptr<float>(eas), ptr<float>(max_eas), ptr<void>(copy), dtype(cd), n, cfg,
                       ptr<int32_t>(flag), ptr<void>(s));
  });
  gpu.def("sgd_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t buf, uintptr_t copy, int cd,
                         int64_t n, const zs::SgdConfig& cfg, uintptr_t flag, uintptr_t s) {
    zs::gpu::sgd_step(ptr<float>(p), ptr<const void>(g), dtype(gd), ptr<float>(buf),
                      ptr<void>(copy), dtype(cd), n, cfg, ptr<int32_t>(flag), ptr<void>(s));
  });
  gpu.def("l2_norm_workspace_bytes", &zs::gpu::l2_norm_workspace_bytes);
  gpu.def("l2_norm_sq", [](uintptr_t x, int d, int64_t n, uintptr_t out, uintptr_t nonfinite,
                           uintptr_t ws, uintptr_t s) {
    zs::gpu::l2_norm_sq(ptr<const void>(x), dtype(d), n, ptr<float>(out),
                        ptr<int32_t>(nonfinite), ptr<void>(ws), ptr<void>(s));
  });
  gpu.def("scale", [](uintptr_t x, int d, int64_t n, float f, uintptr_t s) {
    zs::gpu::scale(ptr<void>(x), dtype(d), n, f, ptr<void>(s));
  });
  gpu.def("quantize", [](uintptr_t x, int d, int64_t n, int bits, int64_t block, uintptr_t q,
                         uintptr_t scales, uintptr_t s) {
    zs::gpu::quantize(ptr<const void>(x), dtype(d), n, bits, block, ptr<int8_t>(q),
                      ptr<float>(scales), ptr<void>(s));
  });
  gpu.def("dequantize", [](uintptr_t q, uintptr_t scales, int64_t n, int bits, int64_t block,
                           uintptr_t out, int d, bool accumulate, uintptr_t s) {
    zs::gpu::dequantize(ptr<const int8_t>(q), ptr<const float>(scales), n, bits, block,
                        ptr<void>(out), dtype(d), accumulate, ptr<void>(s));
  });
  gpu.def("cast", [](uintptr_t src, int sd, uintptr_t dst, int dd, int64_t n, uintptr_t s) {
    zs::gpu::cast(ptr<const void>(src), dtype(sd), ptr<void>(dst), dtype(dd), n, ptr<void>(s));
  });

  // Every NCCL call runs without the GIL: init and teardown may wait for peers, and a
  // collective may block while NCCL connects, so the watchdog thread must be able to run.
  gpu.def("load_nccl", &zs::gpu::load_nccl, py::arg("path") = "",
          py::call_guard<py::gil_scoped_release>());
  gpu.def("nccl_loaded", &zs::gpu::nccl_loaded);
  gpu.def("nccl_version_loaded", &zs::gpu::nccl_version_loaded);
  gpu.def("nccl_version_linked", &zs::gpu::nccl_version_linked);
  gpu.def("nccl_unique_id", [] {
    std::string id;
    {
      py::gil_scoped_release release;
      id = zs::gpu::nccl_unique_id();
    }
    return py::bytes(id);
  });
  gpu.def("ring_bytes_sent", [](const std::string& kind, int64_t payload, int world) {
    for (int k = 0; k < zs::gpu::kNumCollectiveKinds; ++k) {
      const auto ck = static_cast<zs::gpu::CollectiveKind>(k);
      if (kind == zs::gpu::collective_kind_name(ck)) return zs::gpu::ring_bytes_sent(ck, payload, world);
    }
    ZS_REQUIRE(false, "unknown collective kind '" + kind + "'");
    return int64_t{0};
  });

  py::enum_<zs::gpu::ReduceOp>(gpu, "ReduceOp")
      .value("sum", zs::gpu::ReduceOp::sum)
      .value("avg", zs::gpu::ReduceOp::avg)
      .value("max", zs::gpu::ReduceOp::max);
  using Comm = zs::gpu::NcclCommunicator;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::class_<Comm>(gpu, "NcclCommunicator")
      .def(py::init([](py::bytes uid, int rank, int world, int device, double timeout) {
             std::string id(uid);
             py::gil_scoped_release release;
             return new Comm(id, rank, world, device, timeout);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"),
           py::arg("timeout_s"))
      .def_property_readonly("rank", &Comm::rank)
      .def_property_readonly("world_size", &Comm::world_size)
      .def_property_readonly("device", &Comm::device)
      .def_property("timeout_s", &Comm::timeout_s, &Comm::set_timeout_s)
      .def("all_reduce", [](Comm& c, uintptr_t send, uintptr_t recv, int64_t count, int d,
                            zs::gpu::ReduceOp op, uintptr_t s) {
        const auto dt = dtype(d);
        py::gil_scoped_release release;
        c.all_reduce(ptr<const void>(send), ptr<void>(recv), count, dt, op, ptr<void>(s));
      })
      .def("reduce_scatter", [](Comm& c, uintptr_t send, uintptr_t recv, int64_t count, int d,
                                zs::gpu::ReduceOp op, uintptr_t s) {
        const auto dt = dtype(d);
        py::gil_scoped_release release;
        c.reduce_scatter(ptr<const void>(send), ptr<void>(recv), count, dt, op, ptr<void>(s));
      })
      .def("all_gather", [](Comm& c, uintptr_t send, uintptr_t recv, int64_t count, int d,
                            uintptr_t s) {
        const auto dt = dtype(d);
        py::gil_scoped_release release;
        c.all_gather(ptr<const void>(send), ptr<void>(recv), count, dt, ptr<void>(s));
      })
      .def("broadcast", [](Comm& c, uintptr_t send, uintptr_t recv, int64_t count, int d,
                           int root, uintptr_t s) {
        const auto dt = dtype(d);
        py::gil_scoped_release release;
        c.broadcast(ptr<const void>(send), ptr<void>(recv), count, dt, root, ptr<void>(s));
      })
      .def("all_to_all", [](Comm& c, uintptr_t send, uintptr_t recv, int64_t count, int d,
                            uintptr_t s) {
        const auto dt = dtype(d);
        py::gil_scoped_release release;
        c.all_to_all(ptr<const void>(send), ptr<void>(recv), count, dt, ptr<void>(s));
      })
      .def("group_start", &Comm::group_start, release_gil())
      .def("group_end", &Comm::group_end, release_gil())
      .def("synchronize", [](Comm& c, uintptr_t s) {
        py::gil_scoped_release release;
        c.synchronize(ptr<void>(s));
      })
      .def("abort", &Comm::abort, release_gil())
      .def_property_readonly("aborted", &Comm::aborted)
      .def(
          "async_error",
          [](const Comm& c) -> py::object {
            std::string error;
            {
              py::gil_scoped_release release;
              error = c.async_error();
            }
            if (error.empty()) return py::none();
            return py::str(error);
          },
          "NCCL's asynchronous error as a message, or None")
      .def("destroy", &Comm::destroy, release_gil())
      .def("counters", [](const Comm& c) {
        const auto k = c.counters();
        py::dict out;
        for (int i = 0; i < zs::gpu::kNumCollectiveKinds; ++i) {
          py::dict row;
          row["calls"] = k.calls[i];
          row["payload_bytes"] = k.payload_bytes[i];
          row["bytes_sent"] = k.bytes_sent[i];
          out[zs::gpu::collective_kind_name(static_cast<zs::gpu::CollectiveKind>(i))] = row;
        }
        return out;
      })
      .def("reset_counters", &Comm::reset_counters);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "zeroshard's compiled core (thin bindings; use zeroshard.ops)";
  static py::exception<zs::Error> core_error(m, "CoreError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const zs::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const zs::Error& e) {
      py::set_error(core_error, e.what());
    }
  });

  m.def("build_info", [] {
    py::dict d;
    d["version"] = zs::build::kVersion;
    d["variant"] = zs::build::kVariant;
    d["cuda_archs"] = zs::build::kCudaArchs;
    d["cuda_compiler_version"] = zs::build::kCudaCompilerVersion;
    d["compiler"] = zs::build::kCompiler;
    return d;
  });
  bind_configs(m);
  bind_layout(m);
  bind_cpu(m);
  bind_gpu(m);
}
