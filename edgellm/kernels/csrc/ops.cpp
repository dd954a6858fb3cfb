// The custom-op domain ONNX Runtime loads (SessionOptions.register_custom_ops_library), and a small C API through
// which Python tests and tools call the kernels directly.
//
// Op ai.edgellm.kernels::DecoderAttention: com.microsoft::GroupQueryAttention's float32 inputs 0-8 (query, key,
// value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache), outputs and attributes
// num_heads, kv_num_heads, scale, softcap, local_window_size, do_rotary, rotary_interleaved (attention.cpp).
//
// Op ai.edgellm.kernels::MatMulBlocks, inputs as com.microsoft::MatMulNBits (A, B, scales, zero_points).
// Attributes: K, N, bits, block_size as MatMulNBits; isa (the highest instruction-set level to use, kernels.h
// Isa); widened_k (> 0: B was written for [A, block_sums(A), ...] with A of widened_k columns); glu (1: the
// output is silu(A @ gate^T) * (A @ up^T), N / 2 wide, where B's first N / 2 rows are the gate's). With
// norm_epsilon, A is first RMS-normalized (the norm of the decoder blocks): A' = s / sqrt(mean(s^2) + eps) * gamma
// with s = A + skip (input 4, optional) and gamma input 5; output 1 (optional) is s.
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"
#include "ort_abi.h"

namespace edgellm {
namespace {

ort::Api g_api(nullptr);

OrtStatus* error(const std::string& message) {
  return g_api.get<ort::CreateStatusFn>(ort::kCreateStatus)(ORT_FAIL, ("edgellm kernels: " + message).c_str());
}

#define ORT_CHECK(call)                  \
  do {                                   \
    OrtStatus* status_ = (call);         \
    if (status_ != nullptr) return status_; \
  } while (0)

struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

OrtStatus* describe(const OrtValue* value, TensorInfo* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_CHECK(g_api.get<ort::GetTensorTypeAndShapeFn>(ort::kGetTensorTypeAndShape)(value, &info));
  size_t count = 0;
  OrtStatus* status = g_api.get<ort::GetTensorElementTypeFn>(ort::kGetTensorElementType)(info, &out->type);
  if (!status) status = g_api.get<ort::GetDimensionsCountFn>(ort::kGetDimensionsCount)(info, &count);
  if (!status) {
    out->shape.resize(count);
    status = g_api.get<ort::GetDimensionsFn>(ort::kGetDimensions)(info, out->shape.data(), count);
  }
  g_api.get<ort::ReleaseTensorTypeAndShapeInfoFn>(ort::kReleaseTensorTypeAndShapeInfo)(info);
  return status;
}

const void* data_of(const OrtValue* value) {
  void* p = nullptr;
  OrtStatus* status = g_api.get<ort::GetTensorMutableDataFn>(ort::kGetTensorMutableData)(
      const_cast<OrtValue*>(value), &p);
  return status ? nullptr : p;
}

// Once a weight is repacked, its source bytes are never read again. ONNX Runtime maps a bundle's data file into
// memory (copy-on-write, never written); the pages the repacking read would stay in the process's resident set beside the packed copy. Where the
// source lies in a file mapping, those pages are dropped from this process (the file and the page cache keep them,
// so nothing is lost: a later read would fault them in again). Memory that is not a file mapping is left alone.
void release_file_pages(const void* data, size_t bytes) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data), end = begin + bytes;
  FILE* maps = fopen("/proc/self/maps", "r");
  if (!maps) return;
  char line[512];
  bool file_backed = false;
  while (fgets(line, sizeof line, maps)) {
    unsigned long start = 0, stop = 0, inode = 0;
    char perms[8] = {};
    if (sscanf(line, "%lx-%lx %7s %*s %*s %lu", &start, &stop, perms, &inode) != 4) continue;
    if (start <= begin && end <= stop) {
      file_backed = inode != 0;  // ONNX Runtime maps tensors copy-on-write; it never writes to them
      break;
    }
  }
  fclose(maps);
  if (!file_backed) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

struct MatMulBlocks {
  PackedWeight weight;
  Isa isa = kIsaAvx2;
  float norm_epsilon = -1.0f;  // >= 0: the input is RMS-normalized first
  ~MatMulBlocks() { free_weight(&weight); }
};

OrtStatus* attribute(const OrtKernelInfo* info, const char* name, int64_t* out, int64_t fallback, bool required) {
  OrtStatus* status = g_api.get<ort::KernelInfoGetAttributeInt64Fn>(ort::kKernelInfoGetAttribute_int64)(info, name,
                                                                                                        out);
  if (!status) return nullptr;
  if (required) return status;
  g_api.get<ort::ReleaseStatusFn>(ort::kReleaseStatus)(status);
  *out = fallback;
  return nullptr;
}

void float_attribute(const OrtKernelInfo* info, const char* name, float* out, float fallback) {
  OrtStatus* status = g_api.get<ort::KernelInfoGetAttributeFloatFn>(ort::kKernelInfoGetAttribute_float)(info, name,
                                                                                                        out);
  if (status) {
    g_api.get<ort::ReleaseStatusFn>(ort::kReleaseStatus)(status);
    *out = fallback;
  }
}

OrtStatus* constant_input(const OrtKernelInfo* info, size_t count, size_t index, const OrtValue** out) {
  *out = nullptr;
  if (index >= count) return nullptr;
  int is_constant = 0;
  OrtStatus* status = g_api.get<ort::KernelInfoGetConstantInputTensorFn>(ort::kKernelInfoGetConstantInput_tensor)(
      info, index, &is_constant, out);
  if (status) {  // an absent optional input
    g_api.get<ort::ReleaseStatusFn>(ort::kReleaseStatus)(status);
    *out = nullptr;
    return nullptr;
  }
  if (*out && !is_constant) return error("input " + std::to_string(index) + " must be an initializer");
  return nullptr;
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  int64_t k = 0, n = 0, bits = 0, block = 0, isa = 0, widened_k = 0, glu = 0;
  ORT_CHECK(attribute(info, "K", &k, 0, true));
  ORT_CHECK(attribute(info, "N", &n, 0, true));
  ORT_CHECK(attribute(info, "bits", &bits, 4, false));
  ORT_CHECK(attribute(info, "block_size", &block, 0, true));
  ORT_CHECK(attribute(info, "isa", &isa, best_isa(), false));
  ORT_CHECK(attribute(info, "widened_k", &widened_k, 0, false));
  ORT_CHECK(attribute(info, "glu", &glu, 0, false));
  size_t count = 0;
  ORT_CHECK(g_api.get<ort::KernelInfoGetInputCountFn>(ort::kKernelInfo_GetInputCount)(info, &count));
  const OrtValue* inputs[4] = {};
  for (size_t i = 1; i < 4; ++i) ORT_CHECK(constant_input(info, count, i, &inputs[i]));
  if (!inputs[1] || !inputs[2]) return error("the codes and scales must be initializers");
  TensorInfo codes, scales;
  ORT_CHECK(describe(inputs[1], &codes));
  ORT_CHECK(describe(inputs[2], &scales));
  const int64_t k_blocks = (k + block - 1) / block;
  const int64_t blob = block * bits / 8;
  int64_t code_count = 1, scale_count = 1;
  for (int64_t d : codes.shape) code_count *= d;
  for (int64_t d : scales.shape) scale_count *= d;
  if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || code_count != n * k_blocks * blob)
    return error("codes of an unexpected type or size");
  if (scales.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scale_count != n * k_blocks)
    return error("scales of an unexpected type or size");
  const uint8_t* zero_points = nullptr;
  if (inputs[3]) {
    TensorInfo zp;
    ORT_CHECK(describe(inputs[3], &zp));
    if (zp.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) return error("zero points must be uint8");
    zero_points = static_cast<const uint8_t*>(data_of(inputs[3]));
  }
  auto* op = new MatMulBlocks;
  const char* problem = pack_weight(static_cast<const uint8_t*>(data_of(inputs[1])),
                                    static_cast<const float*>(data_of(inputs[2])), zero_points, nullptr, n, k,
                                    static_cast<int>(bits), static_cast<int>(block), widened_k, glu != 0,
                                    &op->weight);
  if (problem) {
    delete op;
    return error(problem);
  }
  float_attribute(info, "norm_epsilon", &op->norm_epsilon, -1.0f);
  for (size_t i = 1; i < 4; ++i) {
    if (!inputs[i]) continue;
    TensorInfo t;
    ORT_CHECK(describe(inputs[i], &t));
    int64_t count_i = 1;
    for (int64_t d : t.shape) count_i *= d;
    release_file_pages(data_of(inputs[i]), static_cast<size_t>(count_i) * (i == 1 || i == 3 ? 1 : 4));
  }
  op->isa = std::min(static_cast<Isa>(isa), best_isa());
  *kernel = op;
  return nullptr;
}

struct Attention {
  int heads = 0, kv_heads = 0;
  bool rotary = false, interleaved = false;
  float scale = 0.0f, softcap = 0.0f;
  int64_t window = -1;
};

OrtStatus* create_attention(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  int64_t heads = 0, kv_heads = 0, window = -1, rotary = 0, interleaved = 0;
  ORT_CHECK(attribute(info, "num_heads", &heads, 0, true));
  ORT_CHECK(attribute(info, "kv_num_heads", &kv_heads, 0, true));
  ORT_CHECK(attribute(info, "local_window_size", &window, -1, false));
  ORT_CHECK(attribute(info, "do_rotary", &rotary, 0, false));
  ORT_CHECK(attribute(info, "rotary_interleaved", &interleaved, 0, false));
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads) return error("num_heads must be a multiple of kv_num_heads");
  auto* op = new Attention;
  op->heads = static_cast<int>(heads);
  op->kv_heads = static_cast<int>(kv_heads);
  op->window = window;
  op->rotary = rotary != 0;
  op->interleaved = interleaved != 0;
  float_attribute(info, "scale", &op->scale, 0.0f);
  float_attribute(info, "softcap", &op->softcap, 0.0f);
  *kernel = op;
  return nullptr;
}

struct AttentionJob {
  const AttentionArgs* args;
  int64_t items_per_sequence;  // kv_heads * s
};

void attention_item(void* user, size_t i) {
  const auto& job = *static_cast<AttentionJob*>(user);
  const AttentionArgs& a = *job.args;
  const int64_t b = static_cast<int64_t>(i) / job.items_per_sequence, rest = static_cast<int64_t>(i) %
                                                                            job.items_per_sequence;
  attention_rows(a, b, static_cast<int>(rest / a.s), rest % a.s);
}

void ort_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* user);

OrtStatus* compute_attention(void* kernel, OrtKernelContext* context) {
  const auto* op = static_cast<Attention*>(kernel);
  const OrtValue* in[9] = {};
  for (size_t i = 0; i < 9; ++i)
    ORT_CHECK(g_api.get<ort::KernelContextGetInputFn>(ort::kKernelContext_GetInput)(context, i, &in[i]));
  if (!in[0] || !in[3] || !in[4] || !in[5]) return error("attention needs query, past_key, past_value, seqlens_k");
  TensorInfo query, past, lengths;
  ORT_CHECK(describe(in[0], &query));
  ORT_CHECK(describe(in[3], &past));
  ORT_CHECK(describe(in[5], &lengths));
  if (query.shape.size() != 3 || past.shape.size() != 4) return error("attention: unexpected input ranks");
  AttentionArgs a;
  a.heads = op->heads;
  a.kv_heads = op->kv_heads;
  a.batch = query.shape[0];
  a.s = query.shape[1];
  a.d = static_cast<int>(past.shape[3]);
  a.capacity = past.shape[2];
  if (past.shape[0] != a.batch || past.shape[1] != a.kv_heads || lengths.shape.size() != 1 ||
      lengths.shape[0] != a.batch)
    return error("attention: the caches or seqlens_k do not match the query's batch");
  a.query = static_cast<const float*>(data_of(in[0]));
  if (in[1] == nullptr) {  // packed [q heads, k heads, v heads]
    if (query.shape[2] != static_cast<int64_t>(a.heads + 2 * a.kv_heads) * a.d)
      return error("attention: packed query of an unexpected width");
    a.query_stride = a.key_stride = a.value_stride = query.shape[2];
    a.key = a.query + a.heads * a.d;
    a.value = a.query + (a.heads + a.kv_heads) * a.d;
  } else {
    if (!in[2] || query.shape[2] != static_cast<int64_t>(a.heads) * a.d) return error("attention: unexpected query");
    a.query_stride = query.shape[2];
    a.key_stride = a.value_stride = static_cast<int64_t>(a.kv_heads) * a.d;
    a.key = static_cast<const float*>(data_of(in[1]));
    a.value = static_cast<const float*>(data_of(in[2]));
  }
  a.seqlens_k = static_cast<const int32_t*>(data_of(in[5]));
  int64_t positions = 0;
  if (op->rotary) {
    if (!in[7] || !in[8]) return error("attention: do_rotary needs cos_cache and sin_cache");
    TensorInfo table;
    ORT_CHECK(describe(in[7], &table));
    if (table.shape.size() != 2 || table.shape[1] * 2 > a.d) return error("attention: unexpected rotary tables");
    a.rotary_dim = static_cast<int>(table.shape[1] * 2);
    positions = table.shape[0];
    a.cos = static_cast<const float*>(data_of(in[7]));
    a.sin = static_cast<const float*>(data_of(in[8]));
  }
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t last = a.seqlens_k[b], first = last + 1 - a.s;
    if (first < 0 || last >= a.capacity || (op->rotary && last >= positions))
      return error("attention: seqlens_k[" + std::to_string(b) + "] = " + std::to_string(last) +
                   " is outside the cache or the rotary tables");
  }
  a.interleaved = op->interleaved;
  a.scale = op->scale != 0.0f ? op->scale : 1.0f / sqrtf(static_cast<float>(a.d));
  a.softcap = op->softcap;
  a.window = op->window;

  std::vector<int64_t> out_shape = {a.batch, a.s, static_cast<int64_t>(a.heads) * a.d};
  OrtValue* out[3] = {};
  ORT_CHECK(g_api.get<ort::KernelContextGetOutputFn>(ort::kKernelContext_GetOutput)(context, 0, out_shape.data(), 3,
                                                                                    &out[0]));
  for (size_t i = 1; i < 3; ++i)
    ORT_CHECK(g_api.get<ort::KernelContextGetOutputFn>(ort::kKernelContext_GetOutput)(context, i, past.shape.data(),
                                                                                      4, &out[i]));
  a.output = static_cast<float*>(const_cast<void*>(data_of(out[0])));
  a.present_key = static_cast<float*>(const_cast<void*>(data_of(out[1])));
  a.present_value = static_cast<float*>(const_cast<void*>(data_of(out[2])));
  const size_t cache_bytes = static_cast<size_t>(a.batch * a.kv_heads * a.capacity * a.d) * sizeof(float);
  if (a.present_key != data_of(in[3])) memcpy(a.present_key, data_of(in[3]), cache_bytes);  // not bound in place
  if (a.present_value != data_of(in[4])) memcpy(a.present_value, data_of(in[4]), cache_bytes);

  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t s = 0; s < a.s; ++s) attention_write_cache(a, b, s);
  AttentionJob job{&a, a.kv_heads * a.s};
  const size_t items = static_cast<size_t>(a.batch * job.items_per_sequence);
  // work: every query head's row against its positions; small calls stay on this thread
  int64_t work = 0;
  for (int64_t b = 0; b < a.batch; ++b) work += (a.seqlens_k[b] + 1) * a.s;
  work *= static_cast<int64_t>(a.heads) * a.d;
  if (items > 1 && work > (1 << 17)) {
    ort_parallel_for(context, attention_item, items, &job);
  } else {
    for (size_t i = 0; i < items; ++i) attention_item(&job, i);
  }
  return nullptr;
}

void destroy_attention(void* kernel) { delete static_cast<Attention*>(kernel); }

void ort_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* user) {
  OrtStatus* status = g_api.get<ort::KernelContextParallelForFn>(ort::kKernelContext_ParallelFor)(
      static_cast<const OrtKernelContext*>(context), fn, total, 0, user);
  if (status) {  // no pool: run here
    g_api.get<ort::ReleaseStatusFn>(ort::kReleaseStatus)(status);
    for (size_t i = 0; i < total; ++i) fn(user, i);
  }
}

OrtStatus* compute(void* kernel, OrtKernelContext* context) {
  const auto* op = static_cast<MatMulBlocks*>(kernel);
  const OrtValue* a = nullptr;
  ORT_CHECK(g_api.get<ort::KernelContextGetInputFn>(ort::kKernelContext_GetInput)(context, 0, &a));
  TensorInfo info;
  ORT_CHECK(describe(a, &info));
  if (info.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || info.shape.empty())
    return error("input A must be a float tensor");
  const int64_t k = info.shape.back();
  int64_t m = 1;
  for (size_t i = 0; i + 1 < info.shape.size(); ++i) m *= info.shape[i];
  if (k != op->weight.k) return error("input A has " + std::to_string(k) + " columns, expected " +
                                      std::to_string(op->weight.k));
  std::vector<int64_t> shape = info.shape;
  shape.back() = op->weight.glu ? op->weight.n / 2 : op->weight.n;
  OrtValue* y = nullptr;
  ORT_CHECK(g_api.get<ort::KernelContextGetOutputFn>(ort::kKernelContext_GetOutput)(context, 0, shape.data(),
                                                                                    shape.size(), &y));
  const float* x = static_cast<const float*>(data_of(a));
  if (op->norm_epsilon >= 0.0f) {  // the decoder block's RMS norm, and its residual sum as output 1
    const OrtValue *skip = nullptr, *gamma = nullptr;
    ORT_CHECK(g_api.get<ort::KernelContextGetInputFn>(ort::kKernelContext_GetInput)(context, 4, &skip));
    ORT_CHECK(g_api.get<ort::KernelContextGetInputFn>(ort::kKernelContext_GetInput)(context, 5, &gamma));
    if (!gamma) return error("a normalized input needs the norm's weight (input 5)");
    OrtValue* total = nullptr;
    ORT_CHECK(g_api.get<ort::KernelContextGetOutputFn>(ort::kKernelContext_GetOutput)(context, 1, info.shape.data(),
                                                                                      info.shape.size(), &total));
    static thread_local std::vector<float> normalized;
    normalized.resize(static_cast<size_t>(m * k));
    rms_norm(x, skip ? static_cast<const float*>(data_of(skip)) : nullptr, static_cast<const float*>(data_of(gamma)),
             m, k, op->norm_epsilon, total ? static_cast<float*>(const_cast<void*>(data_of(total))) : nullptr,
             normalized.data());
    x = normalized.data();
  }
  if (m == 0) return nullptr;
  Parallel par{ort_parallel_for, context};
  matmul(op->weight, x, m, static_cast<float*>(const_cast<void*>(data_of(y))), op->isa, par);
  return nullptr;
}

const char* op_name(const OrtCustomOp*) { return "MatMulBlocks"; }
const char* op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType input_type(const OrtCustomOp*, size_t index) {  // A, B, scales, zero points, skip, gamma
  return index == 1 || index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t input_count(const OrtCustomOp*) { return 6; }
ONNXTensorElementDataType output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t output_count(const OrtCustomOp*) { return 2; }
void destroy(void* kernel) { delete static_cast<MatMulBlocks*>(kernel); }
OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp*, size_t index) {
  return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic output_characteristic(const OrtCustomOp*, size_t index) {
  return index >= 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtMemType input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }

const char* attention_name(const OrtCustomOp*) { return "DecoderAttention"; }
ONNXTensorElementDataType attention_input_type(const OrtCustomOp*, size_t index) {
  return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t attention_input_count(const OrtCustomOp*) { return 9; }
size_t attention_output_count(const OrtCustomOp*) { return 3; }
OrtCustomOpInputOutputCharacteristic attention_output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic attention_input_characteristic(const OrtCustomOp*, size_t index) {
  return index == 1 || index == 2 || index >= 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
int start_version(const OrtCustomOp*) { return 1; }
int end_version(const OrtCustomOp*) { return 1 << 30; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  memset(&op, 0, sizeof(op));
  op.version = ort::kApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

const OrtCustomOp g_matmul_blocks = make_op();

OrtCustomOp make_attention_op() {
  OrtCustomOp op = make_op();
  op.GetName = attention_name;
  op.GetInputType = attention_input_type;
  op.GetInputTypeCount = attention_input_count;
  op.GetOutputTypeCount = attention_output_count;
  op.GetInputCharacteristic = attention_input_characteristic;
  op.GetOutputCharacteristic = attention_output_characteristic;
  op.KernelDestroy = destroy_attention;
  op.CreateKernelV2 = create_attention;
  op.KernelComputeV2 = compute_attention;
  return op;
}

const OrtCustomOp g_decoder_attention = make_attention_op();

// The test API's parallel-for: `threads` std::threads (the caller one of them) taking items in turn.
struct ThreadCount {
  int threads;
};

void thread_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* user) {
  const int threads = static_cast<int>(std::min<size_t>(static_cast<ThreadCount*>(context)->threads, total));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next++; i < total; i = next++) fn(user, i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

}  // namespace
}  // namespace edgellm

extern "C" {

using namespace edgellm;

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(ort::kApiVersion);
  if (!table) return nullptr;  // an ONNX Runtime older than 1.17: nothing registered (Python checks the version)
  g_api = ort::Api(table);
  static OrtCustomOpDomain* domain = [] {
    OrtCustomOpDomain* d = nullptr;
    OrtStatus* status = g_api.get<ort::CreateCustomOpDomainFn>(ort::kCreateCustomOpDomain)("ai.edgellm.kernels", &d);
    if (status) return static_cast<OrtCustomOpDomain*>(nullptr);
    for (const OrtCustomOp* op : {&g_matmul_blocks, &g_decoder_attention}) {
      status = g_api.get<ort::CustomOpDomainAddFn>(ort::kCustomOpDomain_Add)(d, op);
      if (status) return static_cast<OrtCustomOpDomain*>(nullptr);
    }
    return d;
  }();
  if (!domain) return error("could not create the custom-op domain");
  return g_api.get<ort::AddCustomOpDomainFn>(ort::kAddCustomOpDomain)(options, domain);
}

// --- the C API of tests and tools (ctypes) -------------------------------------------------------------------

// The graph rewrite (edgellm/kernels/rewrite.py) emits the ops and attributes of this version; Python refuses a
// library of another (a stale build after an update) and runs ONNX Runtime's kernels instead.
__attribute__((visibility("default"))) int edgellm_version() { return 1; }

__attribute__((visibility("default"))) int edgellm_best_isa() { return best_isa(); }

__attribute__((visibility("default"))) int edgellm_cpu_has(int isa) { return cpu_has(static_cast<Isa>(isa)); }

__attribute__((visibility("default"))) int edgellm_amx_self_test() { return amx_self_test(); }

__attribute__((visibility("default"))) const char* edgellm_isa_name(int isa) { return isa_name(static_cast<Isa>(isa)); }

__attribute__((visibility("default"))) void* edgellm_pack(const uint8_t* codes, const float* scales,
                                                          const uint8_t* zero_points, const float* mins, int64_t n,
                                                          int64_t k, int bits, int block, int64_t widened_k, int glu,
                                                          char* message, size_t message_size) {
  auto* w = new PackedWeight;
  const char* problem = pack_weight(codes, scales, zero_points, mins, n, k, bits, block, widened_k, glu != 0, w);
  if (problem) {
    snprintf(message, message_size, "%s", problem);
    delete w;
    return nullptr;
  }
  return w;
}

// [bytes, half (1: float16 scales), min form (1), k (the input width)]
__attribute__((visibility("default"))) void edgellm_packed_info(const void* weight, int64_t* out) {
  const auto* w = static_cast<const PackedWeight*>(weight);
  out[0] = static_cast<int64_t>(w->bytes);
  out[1] = w->half;
  out[2] = w->mins;
  out[3] = w->k;
}

__attribute__((visibility("default"))) void edgellm_free(void* weight) {
  auto* w = static_cast<PackedWeight*>(weight);
  free_weight(w);
  delete w;
}

// y [m][n] (glu: [m][n / 2]) = x [m][k] @ w^T at instruction-set level `isa` (capped at the CPU's) on `threads`
// threads; returns the level used.
__attribute__((visibility("default"))) int edgellm_matmul(const void* weight, const float* x, int64_t m, float* y,
                                                          int isa, int threads) {
  const Isa level = std::min(static_cast<Isa>(isa), best_isa());
  ThreadCount count{threads < 1 ? 1 : threads};
  Parallel par{thread_parallel_for, &count};
  matmul(*static_cast<const PackedWeight*>(weight), x, m, y, level, par);
  return level;
}

}  // extern "C"
