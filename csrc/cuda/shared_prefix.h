// Shared-prefix packing of BPO groups (see r4b/shared_prefix.py for the layout): plain CUDA launchers
// with raw pointers and a stream, no torch types, so nvcc compiles them on any machine. The torch glue
// (shared_prefix_torch.cpp) and the Python side allocate and validate; these only launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

extern "C" {

// One launch packs every group. Inputs are int64 unless noted; outputs are [num_tokens], every position
// written exactly once. The index tables come from r4b/shared_prefix.py's _plan.
struct R4bPackArgs {
    const int64_t* prompt_tokens;     // every prompt, concatenated
    const int64_t* prompt_offsets;    // [G+1] where prompt g starts in prompt_tokens
    const int64_t* doc_starts;        // [G] packed index of group g's document (its prompt body)
    const int64_t* responses;         // [R, max_len] row-major, right-padded
    const int64_t* response_lengths;  // [R]
    const int64_t* response_starts;   // [R] packed index of each response segment's first position
    const int64_t* group_index;       // [R]
    const int64_t* segment_index;     // [R] segment id of each response (k within its group, or 0)
    const float* advantages;          // [R]
    const float* old_logprobs;        // [R, max_len], or nullptr
    const float* ref_logprobs;        // [R, max_len], or nullptr
    int64_t num_groups;
    int64_t num_responses;
    int64_t max_len;
    int64_t max_segment_len;  // the longest prompt body or response segment (L + 1): sizes the grid

    int64_t* out_input_ids;
    int64_t* out_position_ids;
    int32_t* out_segment_ids;
    int64_t* out_targets;
    bool* out_loss_mask;
    float* out_advantages;
    float* out_old_logprobs;  // nullptr when old_logprobs is
    float* out_ref_logprobs;  // nullptr when ref_logprobs is
    int64_t* out_seq_ids;
};

cudaError_t r4b_pack_shared_prefix(const R4bPackArgs* args, cudaStream_t stream);

// One launch: out[i, j, :] = values[response_starts[i] + j, :] for j < response_lengths[i], zero bytes
// for j up to max_len. A row is row_bytes bytes of any dtype; values and out are contiguous.
cudaError_t r4b_unpack_responses(const void* values, void* out, const int64_t* response_starts,
                                 const int64_t* response_lengths, int64_t num_responses, int64_t max_len,
                                 int64_t row_bytes, cudaStream_t stream);

}  // extern "C"
