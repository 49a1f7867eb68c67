// zs_bench: times the core's Adam step against the machine's own copy bandwidth, measured in
// the same run, with no Python in the way. `--device cpu` (the default) times the CPU kernels;
// `--device gpu` (CUDA variant only) times only the GPU: a device-to-device copy, the fused step,
// the L2 norm and NCCL collectives at world size 1; `--device all` does both.
//
//   zs_bench --sizes 1e6,1e8 --reps 10 --threads 2 --json out.json
//   zs_bench --device gpu --gpu-sizes 1e9 --threads 16 --nccl /path/libnccl.so.2
//
// Bytes per parameter come from the dtypes: p, m, v read and written (24 B) + grad read + the
// optional copy written: bf16 grad in + bf16 copy out = 24 + 2 + 2 = 28 B; fp32 grad, no copy =
// 28 B too. The separate finite check reads the grad once more; it is shown as "28+2" (bf16) or
// "28+4" (fp32) and counted in GB/s and in % of the copy ceiling, which are about bytes actually
// moved: 30 B/param for the checked mixed-precision step. The norm reads its input once (2 or 4
// B/param). The copy ceiling moves a buffer of 16 B/param and counts bytes read + written (see
// cpu_memcpy_ms / cpu_in_place_ms and the d2d copy row).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "zeroshard/build_info.hpp"
#include "zeroshard/cpu_kernels.hpp"
#include "zeroshard/cpu_runtime.hpp"
#include "zeroshard/dtype.hpp"
#include "zeroshard/optim_config.hpp"

#ifdef ZEROSHARD_WITH_CUDA
#include <cuda_runtime.h>

#include "zeroshard/gpu_kernels.hpp"
#include "zeroshard/nccl_communicator.hpp"
#endif

namespace zs = zeroshard;

namespace {

struct Options {
  std::vector<int64_t> sizes{1000000, 100000000};
  std::vector<int64_t> gpu_sizes;  // empty: same as sizes
  int reps = 10;
  int warmup = 2;
  int threads = 2;
  std::string simd;  // empty: the best the CPU has
  std::string json;
  std::string nccl_path;
  bool cpu = true;   // --device cpu|all
  bool gpu = false;  // --device gpu|all: GPU rows only when asked for
};

// One measured line of the table.
struct Row {
  std::string device, what;
  int64_t n = 0;
  double ms = 0;
  double step_bytes = 0;   // per param, the step itself
  double check_bytes = 0;  // per param, the finite check's extra read
  double ceiling_gbps = 0; // copy ceiling of the same run (0: this row is the ceiling)

  double seconds() const { return ms / 1e3; }
  double gparams() const { return n / seconds() / 1e9; }
  double gbps() const { return n * (step_bytes + check_bytes) / seconds() / 1e9; }
  double pct_ceiling() const { return ceiling_gbps > 0 ? 100.0 * gbps() / ceiling_gbps : 100.0; }
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "zs_bench: %s\n"
               "usage: zs_bench [--sizes 1e6,1e8] [--gpu-sizes 1e8,1e9] [--reps 10] [--warmup 2]\n"
               "                [--threads 2] [--simd scalar|avx2|avx512] [--json out.json]\n"
               "                [--nccl /path/libnccl.so.2 (or ZEROSHARD_NCCL_PATH)]\n"
               "                [--device cpu|gpu|all (default cpu; gpu needs the CUDA variant)]\n",
               why.c_str());
  std::exit(2);
}

std::vector<int64_t> parse_sizes(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (end == item.c_str() || *end != '\0' || v < 1 || v > 1e12) usage("bad size '" + item + "'");
    out.push_back(static_cast<int64_t>(v));
  }
  if (out.empty()) usage("--sizes needs at least one size");
  return out;
}

int parse_positive(const std::string& flag, const char* text) {
  const int v = std::atoi(text);
  if (v < 1) usage(flag + " must be a positive integer, got '" + text + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--sizes") o.sizes = parse_sizes(value());
    else if (a == "--gpu-sizes") o.gpu_sizes = parse_sizes(value());
    else if (a == "--reps") o.reps = parse_positive(a, value());
    else if (a == "--warmup") o.warmup = std::atoi(value());
    else if (a == "--threads") o.threads = parse_positive(a, value());
    else if (a == "--simd") o.simd = value();
    else if (a == "--json") o.json = value();
    else if (a == "--nccl") o.nccl_path = value();
    else if (a == "--device") {
      const std::string d = value();
      if (d != "cpu" && d != "gpu" && d != "all") usage("--device must be cpu, gpu or all");
      o.cpu = d != "gpu";
      o.gpu = d != "cpu";
    }
    else if (a == "--help" || a == "-h") usage("help");
    else usage("unknown argument '" + a + "'");
  }
  if (o.warmup < 0) usage("--warmup must be >= 0");
  if (o.gpu_sizes.empty()) o.gpu_sizes = o.sizes;
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

// Median milliseconds of `reps` calls after `warmup` calls, host clock.
double time_host_ms(const Options& o, const std::function<void()>& fn) {
  for (int i = 0; i < o.warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < o.reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(ms);
}

// ---- CPU -------------------------------------------------------------------------------------

// Host buffer touched first by the pool's threads, so pages spread as the kernels use them.
template <class T>
std::unique_ptr<T[]> host_buffer(int64_t n, const std::function<T(int64_t)>& value) {
  std::unique_ptr<T[]> buf(new T[static_cast<std::size_t>(std::max<int64_t>(n, 1))]);
  T* p = buf.get();
  zs::cpu::parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] = value(i);
  });
  return buf;
}

float pattern(int64_t i, float scale) {  // deterministic, nonzero, no subnormals
  const uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
  return scale * (static_cast<float>(h >> 8) / 16777216.0f - 0.5f + 1e-3f);
}

// Two ceilings over 16 B/param, counting bytes read + written: a memcpy into another buffer,
// and an in-place read-modify-write pass. The second is the pattern of the Adam step (p, m, v
// are updated in place, so no cache line is read for ownership only) and on some CPUs the faster
// one (glibc's large memcpy is slow on some AMD parts). The ceiling is the faster of the two.
double cpu_memcpy_ms(const Options& o, int64_t n) {
  const int64_t bytes = 16 * n;
  auto src = host_buffer<char>(bytes, [](int64_t i) { return static_cast<char>(i); });
  auto dst = host_buffer<char>(bytes, [](int64_t) { return char(0); });
  return time_host_ms(o, [&] {
    zs::cpu::parallel_for(bytes, 1 << 20, [&](int64_t b, int64_t e) {
      std::memcpy(dst.get() + b, src.get() + b, static_cast<std::size_t>(e - b));
    });
  });
}

volatile float g_runtime_zero = 0.0f;  // keeps the compiler from deleting x + 0

double cpu_in_place_ms(const Options& o, int64_t n) {
  auto x = host_buffer<float>(4 * n, [](int64_t i) { return pattern(i, 1.0f); });
  const float zero = g_runtime_zero;
  float* data = x.get();
  return time_host_ms(o, [&] {
    zs::cpu::parallel_for(4 * n, 1 << 18, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) data[i] = data[i] + zero;
    });
  });
}

void bench_cpu(const Options& o, int64_t n, std::vector<Row>& rows) {
  rows.push_back({"cpu", "copy ceiling (memcpy)", n, cpu_memcpy_ms(o, n), 32, 0, 0});
  const double memcpy_gbps = rows.back().gbps();
  rows.push_back({"cpu", "copy ceiling (in-place r+w)", n, cpu_in_place_ms(o, n), 32, 0, 0});
  const double ceiling_gbps = std::max(memcpy_gbps, rows.back().gbps());
  rows[rows.size() - 2].ceiling_gbps = rows.back().ceiling_gbps = ceiling_gbps;

  auto p = host_buffer<float>(n, [](int64_t i) { return pattern(i, 2.0f); });
  auto g32 = host_buffer<float>(n, [](int64_t i) { return pattern(i * 7 + 1, 0.02f); });
  auto m = host_buffer<float>(n, [](int64_t) { return 0.0f; });
  auto v = host_buffer<float>(n, [](int64_t) { return 0.0f; });
  auto g16 = host_buffer<uint16_t>(n, [](int64_t) { return uint16_t(0); });
  auto copy16 = host_buffer<uint16_t>(n, [](int64_t) { return uint16_t(0); });
  zs::cpu::cast(g32.get(), zs::DType::f32, g16.get(), zs::DType::bf16, n);

  struct Variant {
    const char* name;
    const void* grad;
    zs::DType grad_dtype;
    void* copy;
    bool check;
  };
  const Variant variants[] = {
      {"adamw fp32", g32.get(), zs::DType::f32, nullptr, true},
      {"adamw fp32, no check", g32.get(), zs::DType::f32, nullptr, false},
      {"adamw bf16 grad+copy", g16.get(), zs::DType::bf16, copy16.get(), true},
      {"adamw bf16 grad+copy, no check", g16.get(), zs::DType::bf16, copy16.get(), false},
  };
  for (const Variant& var : variants) {
    zs::AdamConfig cfg;
    cfg.lr = 1e-4f;
    cfg.beta2 = 0.95f;
    cfg.weight_decay = 0.1f;
    cfg.check_finite = var.check;
    const double ms = time_host_ms(o, [&] {
      ++cfg.step;
      if (zs::cpu::adam_step(p.get(), var.grad, var.grad_dtype, m.get(), v.get(), nullptr,
                             var.copy, zs::DType::bf16, n, cfg))
        throw std::runtime_error("benchmark gradient reported non-finite");
    });
    const double grad_bytes = static_cast<double>(zs::dtype_size(var.grad_dtype));
    const double step_bytes = 24 + grad_bytes + (var.copy ? 2 : 0);
    rows.push_back({"cpu", var.name, n, ms, step_bytes, var.check ? grad_bytes : 0, ceiling_gbps});
  }
}

// ---- GPU -------------------------------------------------------------------------------------

#ifdef ZEROSHARD_WITH_CUDA
void cuda_check(cudaError_t err, const char* call, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(err) +
                             " [zs_bench.cpp:" + std::to_string(line) + "]");
}
#define BENCH_CUDA(call) cuda_check((call), #call, __LINE__)

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(std::size_t bytes) { BENCH_CUDA(cudaMalloc(&ptr, std::max<std::size_t>(bytes, 1))); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr); }
};

// Median milliseconds between events recorded around each call on `stream`.
double time_device_ms(const Options& o, cudaStream_t stream, const std::function<void()>& fn) {
  for (int i = 0; i < o.warmup; ++i) fn();
  cudaEvent_t start, end;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&end));
  std::vector<double> ms;
  for (int i = 0; i < o.reps; ++i) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    fn();
    BENCH_CUDA(cudaEventRecord(end, stream));
    BENCH_CUDA(cudaEventSynchronize(end));
    float elapsed = 0;
    BENCH_CUDA(cudaEventElapsedTime(&elapsed, start, end));
    ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  return median(ms);
}

void upload_pattern(float* dst, int64_t n, float scale) {
  auto host = host_buffer<float>(n, [scale](int64_t i) { return pattern(i, scale); });
  BENCH_CUDA(cudaMemcpy(dst, host.get(), n * sizeof(float), cudaMemcpyHostToDevice));
}

void bench_nccl(const Options& o, int64_t n, const DeviceBuffer& send, const DeviceBuffer& recv,
                cudaStream_t stream, double ceiling_gbps, std::vector<Row>& rows) {
  int device = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  std::string path = o.nccl_path;
  if (path.empty() && std::getenv("ZEROSHARD_NCCL_PATH")) path = std::getenv("ZEROSHARD_NCCL_PATH");
  zs::gpu::load_nccl(path);
  zs::gpu::NcclCommunicator comm(zs::gpu::nccl_unique_id(), 0, 1, device, 60.0);
  const struct {
    const char* name;
    std::function<void()> call;
  } collectives[] = {
      {"nccl all_reduce (ws=1)", [&] {
         comm.all_reduce(send.ptr, recv.ptr, n, zs::DType::f32, zs::gpu::ReduceOp::sum, stream);
       }},
      {"nccl all_gather (ws=1)", [&] { comm.all_gather(send.ptr, recv.ptr, n, zs::DType::f32, stream); }},
      {"nccl reduce_scatter (ws=1)", [&] {
         comm.reduce_scatter(send.ptr, recv.ptr, n, zs::DType::f32, zs::gpu::ReduceOp::sum, stream);
       }},
  };
  for (const auto& c : collectives) {
    const double ms = time_device_ms(o, stream, c.call);
    rows.push_back({"gpu", c.name, n, ms, 4, 0, ceiling_gbps});
  }
  comm.synchronize(stream);
}

void bench_gpu(const Options& o, int64_t n, std::vector<Row>& rows) {
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const std::size_t f32_bytes = static_cast<std::size_t>(n) * 4;
  double ceiling_gbps = 0;
  {
    DeviceBuffer src(4 * f32_bytes), dst(4 * f32_bytes);
    BENCH_CUDA(cudaMemset(src.ptr, 1, 4 * f32_bytes));
    const double ms = time_device_ms(o, stream, [&] {
      BENCH_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, 4 * f32_bytes, cudaMemcpyDeviceToDevice, stream));
    });
    rows.push_back({"gpu", "copy ceiling (d2d)", n, ms, 32, 0, 0});
    ceiling_gbps = rows.back().gbps();
  }
  DeviceBuffer p(f32_bytes), g32(f32_bytes), m(f32_bytes), v(f32_bytes), g16(f32_bytes / 2 + 2),
      copy16(f32_bytes / 2 + 2), flag(sizeof(int32_t));
  upload_pattern(p.as<float>(), n, 2.0f);
  upload_pattern(g32.as<float>(), n, 0.02f);
  BENCH_CUDA(cudaMemset(m.ptr, 0, f32_bytes));
  BENCH_CUDA(cudaMemset(v.ptr, 0, f32_bytes));
  BENCH_CUDA(cudaMemset(flag.ptr, 0, sizeof(int32_t)));
  zs::gpu::cast(g32.ptr, zs::DType::f32, g16.ptr, zs::DType::bf16, n, stream);
  struct Variant {
    const char* name;
    const void* grad;
    zs::DType grad_dtype;
    void* copy;
    bool check;
  };
  const Variant variants[] = {
      {"adamw fp32", g32.ptr, zs::DType::f32, nullptr, true},
      {"adamw fp32, no check", g32.ptr, zs::DType::f32, nullptr, false},
      {"adamw bf16 grad+copy", g16.ptr, zs::DType::bf16, copy16.ptr, true},
      {"adamw bf16 grad+copy, no check", g16.ptr, zs::DType::bf16, copy16.ptr, false},
  };
  for (const Variant& var : variants) {
    zs::AdamConfig cfg;
    cfg.lr = 1e-4f;
    cfg.beta2 = 0.95f;
    cfg.weight_decay = 0.1f;
    cfg.check_finite = var.check;
    const double ms = time_device_ms(o, stream, [&] {
      ++cfg.step;
      zs::gpu::adam_step(p.as<float>(), var.grad, var.grad_dtype, m.as<float>(), v.as<float>(),
                         nullptr, var.copy, zs::DType::bf16, n, cfg,
                         var.check ? flag.as<int32_t>() : nullptr, stream);
    });
    const double grad_bytes = static_cast<double>(zs::dtype_size(var.grad_dtype));
    rows.push_back({"gpu", var.name, n, ms, 24 + grad_bytes + (var.copy ? 2 : 0),
                    var.check ? grad_bytes : 0, ceiling_gbps});
  }
  int32_t found_inf = 0;
  BENCH_CUDA(cudaMemcpy(&found_inf, flag.ptr, sizeof(found_inf), cudaMemcpyDeviceToHost));
  if (found_inf != 0) throw std::runtime_error("benchmark gradient reported non-finite on the GPU");

  // The deterministic L2 norm (what clip_grad_norm_ runs over the gradient shard): reads its
  // input once, so its ceiling is the same copy bandwidth.
  {
    DeviceBuffer workspace(static_cast<std::size_t>(zs::gpu::l2_norm_workspace_bytes())),
        out(sizeof(float));
    const struct {
      const char* name;
      const void* x;
      zs::DType dtype;
    } norms[] = {{"l2 norm bf16", g16.ptr, zs::DType::bf16}, {"l2 norm fp32", g32.ptr, zs::DType::f32}};
    for (const auto& nv : norms) {
      const double ms = time_device_ms(o, stream, [&] {
        zs::gpu::l2_norm_sq(nv.x, nv.dtype, n, out.as<float>(), flag.as<int32_t>(), workspace.ptr,
                            stream);
      });
      rows.push_back({"gpu", nv.name, n, ms, static_cast<double>(zs::dtype_size(nv.dtype)), 0,
                      ceiling_gbps});
    }
    BENCH_CUDA(cudaMemcpy(&found_inf, flag.ptr, sizeof(found_inf), cudaMemcpyDeviceToHost));
    if (found_inf != 0) throw std::runtime_error("the norm reported a non-finite benchmark value");
  }

  // NCCL at world size 1: the cost of a collective call with no peer (launch + local copy).
  // Payload GB/s counts the buffer once (a lower bound on bytes moved). A missing libnccl skips
  // these rows, not the kernel rows above.
  try {
    bench_nccl(o, n, p, m, stream, ceiling_gbps, rows);
  } catch (const std::exception& e) {
    std::printf("nccl: skipped (%s); pass --nccl /path/to/libnccl.so.2 or set "
                "ZEROSHARD_NCCL_PATH\n", e.what());
  }
  BENCH_CUDA(cudaStreamDestroy(stream));
}
#endif  // ZEROSHARD_WITH_CUDA

// ---- output ----------------------------------------------------------------------------------

std::string bytes_label(const Row& r) {
  char buf[32];
  if (r.check_bytes > 0) std::snprintf(buf, sizeof buf, "%g+%g", r.step_bytes, r.check_bytes);
  else std::snprintf(buf, sizeof buf, "%g", r.step_bytes);
  return buf;
}

void print_table(const std::vector<Row>& rows) {
  std::printf("%-4s %-32s %10s %11s %9s %7s %9s %8s\n", "dev", "what", "n", "ms", "Gparam/s",
              "B/par", "GB/s", "%copy");
  for (const Row& r : rows) {
    std::printf("%-4s %-32s %10.3g %11.3f %9.3f %7s %9.1f %7.1f%%\n", r.device.c_str(),
                r.what.c_str(), static_cast<double>(r.n), r.ms, r.gparams(), bytes_label(r).c_str(),
                r.gbps(), r.pct_ceiling());
  }
}

void write_json(const std::string& path, const Options& o, const std::string& simd,
                const std::vector<Row>& rows) {
  std::ofstream f(path);
  if (!f) throw std::runtime_error("cannot write --json file '" + path + "'");
  f << "{\n \"settings\": {\"version\": \"" << zs::build::kVersion << "\", \"variant\": \""
    << zs::build::kVariant << "\", \"compiler\": \"" << zs::build::kCompiler
    << "\", \"threads\": " << zs::cpu::num_threads() << ", \"simd\": \"" << simd
    << "\", \"reps\": " << o.reps << ", \"warmup\": " << o.warmup << "},\n \"rows\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << "  {\"device\": \"" << r.device << "\", \"what\": \"" << r.what << "\", \"n\": " << r.n
      << ", \"ms\": " << r.ms << ", \"gparams_per_s\": " << r.gparams()
      << ", \"step_bytes_per_param\": " << r.step_bytes
      << ", \"check_bytes_per_param\": " << r.check_bytes << ", \"gb_per_s\": " << r.gbps()
      << ", \"pct_of_copy_ceiling\": " << r.pct_ceiling() << "}"
      << (i + 1 < rows.size() ? ",\n" : "\n");
  }
  f << " ]\n}\n";
}

int run(const Options& o) {
  zs::cpu::set_num_threads(o.threads);
  if (!o.simd.empty()) {
    bool known = false;
    for (auto l : {zs::cpu::SimdLevel::scalar, zs::cpu::SimdLevel::avx2, zs::cpu::SimdLevel::avx512}) {
      if (o.simd == zs::cpu::simd_level_name(l)) {
        zs::cpu::set_simd_level(l);
        known = true;
      }
    }
    if (!known) usage("--simd must be scalar, avx2 or avx512");
  }
  const std::string simd = zs::cpu::simd_level_name(zs::cpu::simd_level());
  std::printf("zeroshard %s (%s, %s): %d threads, simd %s, warmup %d, median of %d reps\n",
              zs::build::kVersion, zs::build::kVariant, zs::build::kCompiler,
              zs::cpu::num_threads(), simd.c_str(), o.warmup, o.reps);
  std::vector<Row> rows;
  if (o.cpu) {
    for (int64_t n : o.sizes) bench_cpu(o, n, rows);
  }
#ifdef ZEROSHARD_WITH_CUDA
  if (o.gpu) {
    if (zs::gpu::device_count() == 0)
      throw std::runtime_error("--device " + std::string(o.cpu ? "all" : "gpu") +
                               ": no CUDA device is visible (driver missing or "
                               "CUDA_VISIBLE_DEVICES empty)");
    std::printf("gpu: %s\n", zs::gpu::device_name(0).c_str());
    for (int64_t n : o.gpu_sizes) bench_gpu(o, n, rows);
  }
#else
  if (o.gpu)
    throw std::runtime_error("--device gpu/all: this zs_bench is the CPU variant; build with "
                             "-DZEROSHARD_CUDA=ON");
#endif
  print_table(rows);
  if (!o.json.empty()) write_json(o.json, o, simd, rows);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zs_bench: %s\n", e.what());
    return 1;
  }
}
