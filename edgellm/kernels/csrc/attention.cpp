// Attention over the KV cache, for the decoder graphs' com.microsoft.GroupQueryAttention nodes (the load-time
// rewrite swaps those whose attributes are covered here). ONNX Runtime's kernel costs a fixed ~15 us a call and
// ~4x that with four sequences, whatever the context: for a small model that is a sixth of a decoded token and a
// quarter of a batched step. Here a call is a loop over the new rows.
//
// Semantics, as ONNX Runtime's GroupQueryAttention (float32, caches [batch, kv_heads, capacity, head]):
// - query [B, S, H*D] and key, value [B, S, KV*D], or query packed as [B, S, (H + 2 KV) * D] with key, value empty;
// - the new rows sit at positions p = seqlens_k[b] + 1 - S + s of sequence b; their keys and values are written into
//   the present caches there (the caches are the past ones, bound in place; otherwise the past is copied first);
// - do_rotary: queries and keys rotate by their position with cos/sin tables [positions, R / 2] over the first R
//   channels, halves (i, i + R/2) or, rotary_interleaved, pairs (2i, 2i + 1);
// - a query attends to the last local_window_size positions, its own included (all of [0, p] without a window), as
//   ONNX Runtime 1.32 does (the converter writes the checkpoint's sliding window there); its scores are scaled by
//   `scale` (default 1/sqrt(D)) and, with softcap c > 0, squashed to c * tanh(score / c) before the softmax.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace edgellm {
namespace {

// One head's vector: rotated (if rotary) and scaled, into out.
void rotate(const float* x, int d, int rotary, bool interleaved, const float* cos, const float* sin, float scale,
            float* out) {
  const int half = rotary / 2;
  if (interleaved) {
    for (int i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      out[2 * i] = (a * cos[i] - b * sin[i]) * scale;
      out[2 * i + 1] = (b * cos[i] + a * sin[i]) * scale;
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      out[i] = (a * cos[i] - b * sin[i]) * scale;
      out[i + half] = (b * cos[i] + a * sin[i]) * scale;
    }
  }
  for (int i = rotary; i < d; ++i) out[i] = x[i] * scale;
}

// [sum(v[0]), ..., sum(v[7])]
inline __m256 sums8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// scores[t] = q . keys[t] for t < n, keys d floats apart (d a multiple of 8)
void scores_of(const float* q, const float* keys, int64_t n, int d, float* scores) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(keys + (t + u) * d + c), acc[u]);
    }
    _mm256_storeu_ps(scores + t, sums8(acc));
  }
  for (; t < n; ++t) {
    __m256 acc = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(keys + t * d + c), acc);
    scores[t] = hsum8(acc);
  }
}

// out[0, d) = sum over t < n of probability[t] * values[t], 64 channels at a time in registers
void weighted_sum(const float* probability, const float* values, int64_t n, int d, float* out) {
  for (int c0 = 0; c0 < d; c0 += 64) {
    const int width = d - c0 < 64 ? d - c0 : 64;
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m256 p = _mm256_set1_ps(probability[t]);
      const float* v = values + t * d + c0;
      for (int c = 0; c < width / 8; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int c = 0; c < width / 8; ++c) _mm256_storeu_ps(out + c0 + 8 * c, acc[c]);
  }
}

// softmax of x[0, n) in place, softcap first when c > 0
void softmax(float* x, int64_t n, float softcap) {
  if (softcap > 0.0f) {  // c * tanh(x / c), tanh(u) = 1 - 2 / (exp(2u) + 1)
    const __m256 c = _mm256_set1_ps(softcap), two_over_c = _mm256_set1_ps(2.0f / softcap);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_mul_ps(_mm256_loadu_ps(x + i), two_over_c));
      _mm256_storeu_ps(x + i, _mm256_mul_ps(c, _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)))));
    }
    for (; i < n; ++i) x[i] = softcap * tanhf(x[i] / softcap);
  }
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float largest = hmax8(vmax);
  for (; i < n; ++i) largest = std::max(largest, x[i]);
  const __m256 m = _mm256_set1_ps(largest);
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = hsum8(vsum);
  for (; i < n; ++i) {
    x[i] = expf(x[i] - largest);
    total += x[i];
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inverse));
  for (; i < n; ++i) x[i] /= total;
}

}  // namespace

void attention_write_cache(const AttentionArgs& a, int64_t b, int64_t s) {
  const int64_t p = a.seqlens_k[b] + 1 - a.s + s;
  const int rotary = a.rotary_dim;
  for (int j = 0; j < a.kv_heads; ++j) {
    const float* k = a.key + ((b * a.s + s) * a.key_stride) + j * a.d;
    const float* v = a.value + ((b * a.s + s) * a.value_stride) + j * a.d;
    float* k_out = a.present_key + ((b * a.kv_heads + j) * a.capacity + p) * a.d;
    float* v_out = a.present_value + ((b * a.kv_heads + j) * a.capacity + p) * a.d;
    if (rotary > 0) {
      rotate(k, a.d, rotary, a.interleaved, a.cos + p * (rotary / 2), a.sin + p * (rotary / 2), 1.0f, k_out);
    } else {
      memcpy(k_out, k, a.d * sizeof(float));
    }
    memcpy(v_out, v, a.d * sizeof(float));
  }
}

void attention_rows(const AttentionArgs& a, int64_t b, int j, int64_t s) {
  static thread_local std::vector<float> scratch;
  const int group = a.heads / a.kv_heads;
  const int64_t p = a.seqlens_k[b] + 1 - a.s + s;
  const int64_t first = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
  const int64_t n = p + 1 - first;
  scratch.resize(static_cast<size_t>(group * (n + a.d)));
  float* queries = scratch.data();          // [group][d]
  float* scores = queries + group * a.d;    // [group][n]
  const int rotary = a.rotary_dim;
  for (int g = 0; g < group; ++g) {
    const int h = j * group + g;
    const float* q = a.query + (b * a.s + s) * a.query_stride + h * a.d;
    if (rotary > 0) {
      rotate(q, a.d, rotary, a.interleaved, a.cos + p * (rotary / 2), a.sin + p * (rotary / 2), a.scale,
             queries + g * a.d);
    } else {
      for (int i = 0; i < a.d; ++i) queries[g * a.d + i] = q[i] * a.scale;
    }
  }
  const float* keys = a.present_key + ((b * a.kv_heads + j) * a.capacity + first) * a.d;
  const float* values = a.present_value + ((b * a.kv_heads + j) * a.capacity + first) * a.d;
  for (int g = 0; g < group; ++g) {
    scores_of(queries + g * a.d, keys, n, a.d, scores + g * n);
    softmax(scores + g * n, n, a.softcap);
    weighted_sum(scores + g * n, values, n, a.d, a.output + (b * a.s + s) * a.heads * a.d + (j * group + g) * a.d);
  }
}

}  // namespace edgellm
