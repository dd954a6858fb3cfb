// The part of ONNX Runtime's C API that edgellm's custom-op library uses, declared here because the onnxruntime
// wheel ships no headers. The OrtApi struct is a table of function pointers whose order is append-only across
// releases (onnxruntime_c_api.h: "struct OrtApi"), so each entry is reached by its position in that table. Every
// entry used here predates API version 17 (ONNX Runtime 1.17), the version this library asks for.
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" {

struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtApi;  // opaque here: a table of function pointers, read through OrtApiTable below

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, ORT_NOT_IMPLEMENTED = 9, ORT_INVALID_GRAPH = 10 };

enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
};

enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };
enum OrtMemType { OrtMemTypeDefault = 0 };

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp, field for field (onnxruntime_c_api.h, "struct OrtCustomOp"); `version` tells ONNX Runtime which of
// the later fields it may read.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

namespace edgellm::ort {

constexpr uint32_t kApiVersion = 17;  // KernelContext_ParallelFor arrived in 1.17; the rest is older

// Positions in the OrtApi table (checked against onnxruntime_c_api.h of API version 29 by offsetof).
enum Entry : size_t {
  kCreateStatus = 0,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomain_Add = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttribute_float = 85,
  kKernelInfoGetAttribute_int64 = 86,
  kKernelContext_GetInput = 90,
  kKernelContext_GetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelInfo_GetInputCount = 230,
  kKernelInfoGetConstantInput_tensor = 249,
  kKernelContext_ParallelFor = 274,
};

// The function types of those entries (their signatures in onnxruntime_c_api.h).
using CreateStatusFn = OrtStatus* (*)(OrtErrorCode, const char*);
using GetErrorMessageFn = const char* (*)(const OrtStatus*);
using CreateCustomOpDomainFn = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
using CustomOpDomainAddFn = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
using AddCustomOpDomainFn = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
using GetTensorMutableDataFn = OrtStatus* (*)(OrtValue*, void**);
using GetTensorElementTypeFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, ONNXTensorElementDataType*);
using GetDimensionsCountFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
using GetDimensionsFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
using GetTensorTypeAndShapeFn = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
using KernelInfoGetAttributeFloatFn = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
using KernelInfoGetAttributeInt64Fn = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
using KernelContextGetInputFn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
using KernelContextGetOutputFn = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
using ReleaseStatusFn = void (*)(OrtStatus*);
using ReleaseTensorTypeAndShapeInfoFn = void (*)(OrtTensorTypeAndShapeInfo*);
using KernelInfoGetInputCountFn = OrtStatus* (*)(const OrtKernelInfo*, size_t*);
using KernelInfoGetConstantInputTensorFn = OrtStatus* (*)(const OrtKernelInfo*, size_t, int*, const OrtValue**);
using KernelContextParallelForFn = OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t,
                                                  void*);

// The table, typed: api.get<Fn>(kEntry)(args...).
class Api {
 public:
  explicit Api(const OrtApi* table) : table_(reinterpret_cast<void* const*>(table)) {}
  template <typename Fn>
  Fn get(Entry entry) const { return reinterpret_cast<Fn>(table_[entry]); }
  bool valid() const { return table_ != nullptr; }

 private:
  void* const* table_;
};

}  // namespace edgellm::ort
