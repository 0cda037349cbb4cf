// r4b._cuda: the torch glue of shared_prefix.cu, built by setup.py only where torch has CUDA.
// r4b/shared_prefix.py validates the inputs, computes the index tables and allocates the outputs; this
// checks what could corrupt memory (device, dtype, contiguity, sizes) and launches on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "shared_prefix.h"

namespace {

using OptionalTensor = std::optional<at::Tensor>;

void* checked_ptr(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                  const at::Device& device) {
    TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
    return t.data_ptr();
}

template <typename T>
T* checked(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& device) {
    return static_cast<T*>(checked_ptr(t, name, dtype, numel, device));
}

template <typename T>
T* checked(const OptionalTensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& device) {
    return t ? checked<T>(*t, name, dtype, numel, device) : nullptr;
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void pack_shared_prefix(const at::Tensor& prompt_tokens, const at::Tensor& prompt_offsets, const at::Tensor& doc_starts,
                        const at::Tensor& responses, const at::Tensor& response_lengths,
                        const at::Tensor& response_starts, const at::Tensor& group_index,
                        const at::Tensor& segment_index, const at::Tensor& advantages,
                        const OptionalTensor& old_logprobs, const OptionalTensor& ref_logprobs,
                        int64_t max_segment_len, const at::Tensor& input_ids, const at::Tensor& position_ids,
                        const at::Tensor& segment_ids, const at::Tensor& targets, const at::Tensor& loss_mask,
                        const at::Tensor& out_advantages, const OptionalTensor& out_old_logprobs,
                        const OptionalTensor& out_ref_logprobs, const at::Tensor& seq_ids) {
    TORCH_CHECK(responses.is_cuda() && responses.dim() == 2, "responses must be a 2-D CUDA tensor");
    TORCH_CHECK(old_logprobs.has_value() == out_old_logprobs.has_value() &&
                    ref_logprobs.has_value() == out_ref_logprobs.has_value(),
                "each per-token input needs its output and vice versa");
    const at::Device device = responses.device();
    const int64_t R = responses.size(0), max_len = responses.size(1), G = doc_starts.numel(), N = input_ids.numel();
    const auto L = at::kLong, F = at::kFloat;

    R4bPackArgs a{};
    a.prompt_tokens = checked<int64_t>(prompt_tokens, "prompt_tokens", L, prompt_tokens.numel(), device);
    a.prompt_offsets = checked<int64_t>(prompt_offsets, "prompt_offsets", L, G + 1, device);
    a.doc_starts = checked<int64_t>(doc_starts, "doc_starts", L, G, device);
    a.responses = checked<int64_t>(responses, "responses", L, R * max_len, device);
    a.response_lengths = checked<int64_t>(response_lengths, "response_lengths", L, R, device);
    a.response_starts = checked<int64_t>(response_starts, "response_starts", L, R, device);
    a.group_index = checked<int64_t>(group_index, "group_index", L, R, device);
    a.segment_index = checked<int64_t>(segment_index, "segment_index", L, R, device);
    a.advantages = checked<float>(advantages, "advantages", F, R, device);
    a.old_logprobs = checked<float>(old_logprobs, "old_logprobs", F, R * max_len, device);
    a.ref_logprobs = checked<float>(ref_logprobs, "ref_logprobs", F, R * max_len, device);
    a.num_groups = G;
    a.num_responses = R;
    a.max_len = max_len;
    a.max_segment_len = max_segment_len;
    a.out_input_ids = checked<int64_t>(input_ids, "input_ids", L, N, device);
    a.out_position_ids = checked<int64_t>(position_ids, "position_ids", L, N, device);
    a.out_segment_ids = checked<int32_t>(segment_ids, "segment_ids", at::kInt, N, device);
    a.out_targets = checked<int64_t>(targets, "targets", L, N, device);
    a.out_loss_mask = checked<bool>(loss_mask, "loss_mask", at::kBool, N, device);
    a.out_advantages = checked<float>(out_advantages, "out_advantages", F, N, device);
    a.out_old_logprobs = checked<float>(out_old_logprobs, "out_old_logprobs", F, N, device);
    a.out_ref_logprobs = checked<float>(out_ref_logprobs, "out_ref_logprobs", F, N, device);
    a.out_seq_ids = checked<int64_t>(seq_ids, "seq_ids", L, N, device);

    const c10::cuda::CUDAGuard guard(device);
    check_launch(r4b_pack_shared_prefix(&a, c10::cuda::getCurrentCUDAStream()), "r4b_pack_shared_prefix");
}

void unpack_responses(const at::Tensor& values, const at::Tensor& out, const at::Tensor& response_starts,
                      const at::Tensor& response_lengths) {
    TORCH_CHECK(values.is_cuda() && values.dim() >= 1, "values must be a CUDA tensor of at least one dimension");
    TORCH_CHECK(out.dim() == values.dim() + 1 && out.sizes().slice(2).equals(values.sizes().slice(1)),
                "out must be [R, max_len, ...] with values' trailing dimensions");
    const at::Device device = values.device();
    const int64_t R = out.size(0), max_len = out.size(1);
    int64_t row_elements = 1;
    for (const int64_t size : values.sizes().slice(1)) row_elements *= size;
    void* dst = checked_ptr(out, "out", values.scalar_type(), out.numel(), device);
    const void* src = checked_ptr(values, "values", values.scalar_type(), values.numel(), device);
    const int64_t* starts = checked<int64_t>(response_starts, "response_starts", at::kLong, R, device);
    const int64_t* lengths = checked<int64_t>(response_lengths, "response_lengths", at::kLong, R, device);

    const c10::cuda::CUDAGuard guard(device);
    check_launch(r4b_unpack_responses(src, dst, starts, lengths, R, max_len,
                                      row_elements * static_cast<int64_t>(values.element_size()),
                                      c10::cuda::getCurrentCUDAStream()),
                 "r4b_unpack_responses");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "r4b CUDA kernels (see r4b.shared_prefix for the documented Python API)";
    m.def("pack_shared_prefix", &pack_shared_prefix, "Scatter every BPO group into its packed document");
    m.def("unpack_responses", &unpack_responses, "Gather per-token values back to [response, token]");
}
