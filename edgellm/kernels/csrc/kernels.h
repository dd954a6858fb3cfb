// edgellm's CPU matmul kernels: weights in blocks (4- or 8-bit codes, a scale per block of 16..256 inputs, and
// either a constant zero point or a float minimum per block), activations rounded to int8 per block at run time
// (as ONNX Runtime's MatMulNBits does at accuracy level 4 and llama.cpp does with its q8 blocks), integer dot
// products per block, one float multiply-add per block.
//
// This header holds plain data and declarations only: each instruction-set file is compiled for its own target, so
// no inline code may be shared between them (a linker could otherwise keep an AVX-512 copy for every caller).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace edgellm {

// Instruction-set levels, lowest first. Each kernel file implements one; the dispatcher picks the highest the CPU
// and the caller allow.
enum Isa : int { kIsaNone = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };

// Outputs per panel: a panel holds 16 output rows of the weight, interleaved so that one 64-byte vector holds 4
// consecutive inputs of each of the 16 (the operand layout of vpdpbusd and of AMX's int8 tiles).
constexpr int kPanel = 16;

// A weight [n outputs, k inputs] repacked at load. Panels follow each other; a panel is one stream of records
// (reading it in order reads memory in order): a record holds `group` consecutive blocks (the last one may hold
// fewer), first their codes, then their 16 scales each, then (min form) their 16 minimums each; `group` is 2 where
// one block's scales would leave the next block's codes off a 64-byte boundary. A block's codes, for 8 bits: groups of 4 inputs, each 64 bytes
// (output j's 4 codes at 4j..4j+3); for 4 bits: pairs of those groups in 64 bytes, the first in the low nibbles,
// the second in the high ones. An output decodes as scale * (code - 2^(bits-1)) in the symmetric form, scale *
// code + min in the min form.
struct PackedWeight {
  int64_t n = 0, k = 0;   // outputs; inputs before padding to whole blocks
  int bits = 4;           // 4 or 8
  int block = 32;         // inputs per block: a power of two, 16..256
  int64_t k_blocks = 0;   // ceil(k / block)
  int64_t panels = 0;     // ceil(n / 16)
  bool mins = false;      // min form (zero points and minimums); else symmetric
  bool half = true;       // scales and minimums stored as float16 (else float32)
  bool glu = false;       // rows [0, n/2) gate and [n/2, n) up projections, panels paired: gate, up, gate, up...
  size_t code_bytes = 0;  // one block's codes in one panel: block * 16 * bits / 8
  size_t scale_bytes = 0; // one block's 16 scales (or minimums): 32 or 64
  int group = 1;          // blocks per record
  size_t panel_bytes = 0; // the records of a panel, padded to 64 bytes
  uint8_t* data = nullptr;
  size_t bytes = 0;       // panels * panel_bytes
  // where block b lies in every panel: its codes at offsets[3 b], its scales at offsets[3 b + 1], its minimums at
  // offsets[3 b + 2], in bytes from the panel's start
  uint32_t* offsets = nullptr;
};

// Activation rows rounded to int8 per block: x ~ scale * q, |q| <= 127, q = round-half-even(x * 127 / amax).
struct QuantizedRows {
  int64_t m = 0;         // rows
  int64_t k_pad = 0;     // k_blocks * block: the rows' length, zero after k
  int64_t k_blocks = 0;
  int block = 0;
  int8_t* q = nullptr;       // [m][k_pad]
  float* scale = nullptr;    // [m][k_blocks]
  int32_t* offset = nullptr; // [m][k_blocks]: -2^(bits-1) * sum(q) per block (the symmetric form's zero point)
  // [m][k_blocks]: scale * sum(q) per block, what the min form's minimum multiplies. (The rounded sum, not x's
  // own: then the rounding errors of a block meet the weight's true values, scale * code + min, which mostly
  // cancel, not its codes, which are all positive.)
  float* sum = nullptr;
};

// A parallel-for over [0, total): ONNX Runtime's intra-op pool inside a session, std::threads in the test API.
struct Parallel {
  void (*run)(void* context, void (*fn)(void*, size_t), size_t total, void* user) = nullptr;
  void* context = nullptr;
};

// The kernels of one instruction set. Outputs go to y, whose rows are ldy floats apart: the gemv writes row row0
// + r, panel p0 + i at y + r * ldy + 16 i; gemm_panel writes row r at y + r * ldy.
struct IsaKernels {
  // Rows [row0, row1) of x [m][k] into q (whose block, k_pad and k_blocks are set); zero_point = 2^(bits-1).
  void (*quantize)(const float* x, int64_t k, int64_t row0, int64_t row1, int zero_point, QuantizedRows* q);
  // Rows [row0, row0 + rows) (rows <= 8) against panels [p0, p1), each block's codes widened once for all rows.
  void (*gemv)(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int rows, int64_t p0, int64_t p1,
               float* y, int64_t ldy);
  // Every row of q against panel p, which stays in the caches while the rows pass over it.
  void (*gemm_panel)(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy);
  // out[r][j] = silu(y[r][j]) * y[r][16 + j] for j < 16 and `rows` rows (the gated MLP's activation, on a gate
  // panel and its up panel side by side).
  void (*silu_glu)(const float* y, int64_t ldy, int64_t rows, float* out, int64_t ldo);
};

extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kAvx512Kernels;
// AMX: the AVX-512 kernels' quantize and gemv, and this many-row kernel, which reads q's rows 16 at a time (the
// driver pads them with zero rows)
void amx_gemm_panel(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy);
constexpr int kAmxRows = 16;

// Attention over a KV cache (attention.cpp; ops.cpp reads the inputs): the arguments of one call.
struct AttentionArgs {
  int heads = 0, kv_heads = 0, d = 0;  // query heads, key/value heads, channels per head
  int64_t batch = 0, s = 0;            // sequences, new rows per sequence
  int64_t capacity = 0;                // positions the caches hold
  const float* query = nullptr;        // [B, S, query_stride], head h at h * d
  const float* key = nullptr;          // [B, S, key_stride], kv head j at j * d
  const float* value = nullptr;
  int64_t query_stride = 0, key_stride = 0, value_stride = 0;
  const int32_t* seqlens_k = nullptr;  // [B]: positions held after this call, minus one
  const float* cos = nullptr;          // [positions, rotary_dim / 2], when rotary_dim > 0
  const float* sin = nullptr;
  int rotary_dim = 0;                  // channels rotated (0: no rotary)
  bool interleaved = false;
  float scale = 1.0f, softcap = 0.0f;
  int64_t window = -1;                 // > 0: attend to the last `window` positions, p included
  float* present_key = nullptr;        // [B, KV, capacity, d]
  float* present_value = nullptr;
  float* output = nullptr;             // [B, S, H * d]
};
// Writes the new row s of sequence b into the caches (its key rotated).
void attention_write_cache(const AttentionArgs& a, int64_t b, int64_t s);
// The output of row s of sequence b for the query heads of key/value head j (after every new row is written).
void attention_rows(const AttentionArgs& a, int64_t b, int j, int64_t s);

// CPU features (cpu.cpp).
bool cpu_has(Isa isa);          // the CPU and the OS support this level
Isa best_isa();                 // the highest supported level
const char* isa_name(Isa isa);  // "avx2", "avx512-vnni", "amx-int8", "none"
bool amx_enable();              // asks Linux for the AMX tile state once; false if refused
// Runs the AMX kernel on a sample in a child process and compares it with AVX-512's: 1 equal, 0 different, -1 the
// child crashed (a compiler's or CPU's AMX fault), -2 no AMX.
int amx_self_test();

// Repacking (pack.cpp). Inputs in MatMulNBits' layout: codes [n][k_blocks_in][block * bits / 8] (4-bit: low nibble
// first), scales [n * k_blocks_in], zero_points (nullable; 4-bit: two per byte per row, low first; 8-bit: one per
// byte), minimums (nullable; [k_blocks][n], added as minimum * sum(x of the block)). widened_k > 0: the weight was
// written for the input [x, block_sums(x), block_sums(x), ...] with x of widened_k values (the converter's
// folded minimums): the part past widened_k becomes per-block minimums. glu: the rows are a gate projection and an
// up projection of n / 2 each (n / 2 a multiple of 16), whose panels are interleaved for matmul's silu_glu.
// Returns an error message or nullptr.
const char* pack_weight(const uint8_t* codes, const float* scales, const uint8_t* zero_points, const float* mins,
                        int64_t n, int64_t k, int bits, int block, int64_t widened_k, bool glu, PackedWeight* out);
void free_weight(PackedWeight* w);

// out [m][k] = s / sqrt(mean(s^2) + eps) * gamma per row, s = x + skip (skip nullable); total, nullable, gets s.
void rms_norm(const float* x, const float* skip, const float* gamma, int64_t m, int64_t k, float eps, float* total,
              float* out);

// y [m][n] = x [m][k] @ w^T with the kernels of `isa` (at most the CPU's), threads through `par`; for a glu
// weight, y [m][n / 2] = silu(x @ gate^T) * (x @ up^T).
void matmul(const PackedWeight& w, const float* x, int64_t m, float* y, Isa isa, const Parallel& par);

}  // namespace edgellm
