// The matmul driver: round the activations to int8 blocks, then split the panels over the threads. Few rows
// (decoding) stream each panel once for all rows; many rows (prefill) give each thread whole panels, which stay
// in its caches while every row passes over them.
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace edgellm {
namespace {

constexpr int64_t kGemvRows = 8;             // up to this many rows share one pass over the weights
constexpr int64_t kSerialWeights = 1 << 15;  // smaller matmuls run on the calling thread alone
constexpr int64_t kSerialQuantize = 1 << 16; // activations of fewer values are rounded on the calling thread

struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
  std::vector<int32_t> offset;
};

struct Job {
  const PackedWeight* w;
  const IsaKernels* kernels;
  const float* x;
  QuantizedRows* q;
  float* y;
  int64_t per_item;  // rows (quantize) or panels (gemv) per work item
  int zero_point;
};

void quantize_item(void* user, size_t i) {
  const Job& job = *static_cast<Job*>(user);
  const int64_t r0 = static_cast<int64_t>(i) * job.per_item;
  const int64_t r1 = std::min(job.q->m, r0 + job.per_item);
  job.kernels->quantize(job.x, job.w->k, r0, r1, job.zero_point, job.q);
}

// A glu weight's work is counted in pairs of panels (gate, up), each pair giving 16 outputs.
void gemv_item(void* user, size_t i) {
  const Job& job = *static_cast<Job*>(user);
  const PackedWeight& w = *job.w;
  const int64_t units = w.glu ? w.panels / 2 : w.panels;
  const int64_t u0 = static_cast<int64_t>(i) * job.per_item, u1 = std::min(units, u0 + job.per_item);
  for (int64_t r = 0; r < job.q->m; r += kGemvRows) {
    const int rows = static_cast<int>(std::min(kGemvRows, job.q->m - r));
    if (!w.glu) {
      job.kernels->gemv(&w, job.q, r, rows, u0, u1, job.y + r * w.n + u0 * kPanel, w.n);
      continue;
    }
    alignas(64) float pair[kGemvRows * 2 * kPanel];
    for (int64_t u = u0; u < u1; ++u) {
      job.kernels->gemv(&w, job.q, r, rows, 2 * u, 2 * u + 2, pair, 2 * kPanel);
      job.kernels->silu_glu(pair, 2 * kPanel, rows, job.y + r * (w.n / 2) + u * kPanel, w.n / 2);
    }
  }
}

void gemm_item(void* user, size_t i) {
  const Job& job = *static_cast<Job*>(user);
  const PackedWeight& w = *job.w;
  const int64_t u = static_cast<int64_t>(i);
  if (!w.glu) {
    job.kernels->gemm_panel(&w, job.q, u, job.y + u * kPanel, w.n);
    return;
  }
  static thread_local std::vector<float> pair;
  pair.resize(static_cast<size_t>(job.q->m) * 2 * kPanel);
  job.kernels->gemm_panel(&w, job.q, 2 * u, pair.data(), 2 * kPanel);
  job.kernels->gemm_panel(&w, job.q, 2 * u + 1, pair.data() + kPanel, 2 * kPanel);
  job.kernels->silu_glu(pair.data(), 2 * kPanel, job.q->m, job.y + u * kPanel, w.n / 2);
}

void run(const Parallel& par, bool parallel, size_t total, void (*fn)(void*, size_t), Job* job) {
  if (parallel && par.run && total > 1) {
    par.run(par.context, fn, total, job);
  } else {
    for (size_t i = 0; i < total; ++i) fn(job, i);
  }
}

const IsaKernels& kernels_for(Isa isa) {
  static const IsaKernels amx = {kAvx512Kernels.quantize, kAvx512Kernels.gemv, amx_gemm_panel,
                                 kAvx512Kernels.silu_glu};
  if (isa >= kIsaAmx) return amx;
  if (isa >= kIsaAvx512) return kAvx512Kernels;
  return kAvx2Kernels;
}

}  // namespace

void rms_norm(const float* x, const float* skip, const float* gamma, int64_t m, int64_t k, float eps, float* total,
              float* out) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    float* s = total ? total + r * k : out + r * k;
    float squares = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      s[i] = skip ? xr[i] + skip[r * k + i] : xr[i];
      squares += s[i] * s[i];
    }
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(k) + eps);
    for (int64_t i = 0; i < k; ++i) out[r * k + i] = s[i] * scale * gamma[i];
  }
}

void matmul(const PackedWeight& w, const float* x, int64_t m, float* y, Isa isa, const Parallel& par) {
  static thread_local Scratch scratch;
  if (isa < kIsaAvx2) return;  // the library registers nothing on such a CPU
  const bool tiles = isa >= kIsaAmx && m > kGemvRows;
  const int64_t k_pad = w.k_blocks * w.block;
  const int64_t rows = tiles ? (m + kAmxRows - 1) / kAmxRows * kAmxRows : m;  // AMX reads whole tiles of rows
  scratch.q.resize(static_cast<size_t>(rows * k_pad) + 64);
  scratch.scale.resize(static_cast<size_t>(rows * w.k_blocks));
  scratch.sum.resize(static_cast<size_t>(rows * w.k_blocks));
  scratch.offset.resize(static_cast<size_t>(rows * w.k_blocks));
  if (rows > m) {
    memset(scratch.q.data() + m * k_pad, 0, static_cast<size_t>((rows - m) * k_pad));
    memset(scratch.scale.data() + m * w.k_blocks, 0, static_cast<size_t>((rows - m) * w.k_blocks) * 4);
    memset(scratch.sum.data() + m * w.k_blocks, 0, static_cast<size_t>((rows - m) * w.k_blocks) * 4);
    memset(scratch.offset.data() + m * w.k_blocks, 0, static_cast<size_t>((rows - m) * w.k_blocks) * 4);
  }
  QuantizedRows q;
  q.m = m;
  q.k_pad = k_pad;
  q.k_blocks = w.k_blocks;
  q.block = w.block;
  q.q = scratch.q.data();
  q.scale = scratch.scale.data();
  q.sum = scratch.sum.data();
  q.offset = scratch.offset.data();

  Job job{&w, &kernels_for(isa), x, &q, y, 0, 1 << (w.bits - 1)};
  const bool parallel = w.n * w.k >= kSerialWeights;
  job.per_item = std::max<int64_t>(1, m / 16);
  run(par, m * w.k >= kSerialQuantize, static_cast<size_t>((m + job.per_item - 1) / job.per_item), quantize_item,
      &job);
  const int64_t units = w.glu ? w.panels / 2 : w.panels;
  if (m <= kGemvRows) {
    job.per_item = std::max<int64_t>(1, units / 32);
    run(par, parallel, static_cast<size_t>((units + job.per_item - 1) / job.per_item), gemv_item, &job);
  } else {
    run(par, parallel, static_cast<size_t>(units), gemm_item, &job);
  }
}

int amx_self_test() {
  static const int result = [] {
    if (!cpu_has(kIsaAmx)) return -2;
    const pid_t child = fork();
    if (child < 0) return -1;
    if (child == 0) {  // sample weights of each form, 40 rows: two whole tiles of rows and part of a third
      uint32_t state = 12345;
      auto next = [&state] { return state = state * 1664525u + 1013904223u; };
      bool same = true;
      for (int bits : {4, 8}) {
        for (int block : {16, 32, 128}) {
          for (bool zero_points : {false, true}) {
            const int64_t n = 40, k = 256, m = 40, k_blocks = k / block;
            std::vector<uint8_t> codes(n * k * bits / 8), zp((n * k_blocks * bits + 7) / 8);
            std::vector<float> scales(n * k_blocks), x(m * k), y0(m * n), y1(m * n);
            for (auto& c : codes) c = static_cast<uint8_t>(next() >> 24);
            for (auto& z : zp) z = static_cast<uint8_t>(next() >> 24);
            for (auto& s : scales) s = 0.001f + (next() >> 8) * 1e-10f;
            for (auto& v : x) v = static_cast<float>(static_cast<int32_t>(next())) * 1e-9f;
            PackedWeight w;
            if (pack_weight(codes.data(), scales.data(), zero_points ? zp.data() : nullptr, nullptr, n, k, bits,
                            block, 0, false, &w))
              _exit(1);
            matmul(w, x.data(), m, y0.data(), kIsaAvx512, Parallel{});
            matmul(w, x.data(), m, y1.data(), kIsaAmx, Parallel{});
            float worst = 0, largest = 0;
            for (size_t i = 0; i < y0.size(); ++i) {
              worst = std::max(worst, std::fabs(y0[i] - y1[i]));
              largest = std::max(largest, std::fabs(y0[i]));
            }
            same = same && worst <= 1e-5f * largest;
            free_weight(&w);
          }
        }
      }
      _exit(same ? 0 : 1);
    }
    int status = 0;
    if (waitpid(child, &status, 0) != child) return -1;
    if (WIFEXITED(status)) return WEXITSTATUS(status) == 0 ? 1 : 0;
    return -1;  // a signal: SIGILL, SIGSEGV
  }();
  return result;
}

}  // namespace edgellm
