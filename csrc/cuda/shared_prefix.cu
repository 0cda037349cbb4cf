// Shared-prefix packing of BPO groups on the GPU: one launch scatters every group into its packed
// document, one launch gathers per-token values back to [response, token]. The layout and the torch
// implementation these must match are in r4b/shared_prefix.py. No torch headers: `nvcc -c` compiles
// this anywhere, and the per-position work is __host__ __device__ so a host loop can replay a grid.
#include <climits>
#include <cstdint>

#include "shared_prefix.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y
constexpr int64_t kIgnoreIndex = -100;

// Blocks along y split one segment's positions; beyond the limit the threads stride.
unsigned grid_y(int64_t longest) {
    const int64_t blocks = (longest + kThreads - 1) / kThreads;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGridY ? kMaxGridY : blocks));
}

// What one packed position holds; the defaults are those of a position outside the loss.
struct Token {
    int64_t input_id;
    int64_t position;
    int32_t segment;
    int64_t target = kIgnoreIndex;
    float advantage = 0.f;
    float old_logprob = 0.f;
    float ref_logprob = 0.f;
    int64_t seq_id = -1;
};

__host__ __device__ inline void store(const R4bPackArgs& a, int64_t dest, const Token& t) {
    a.out_input_ids[dest] = t.input_id;
    a.out_position_ids[dest] = t.position;
    a.out_segment_ids[dest] = t.segment;
    a.out_targets[dest] = t.target;
    a.out_loss_mask[dest] = t.target != kIgnoreIndex;
    a.out_advantages[dest] = t.advantage;
    if (a.out_old_logprobs) a.out_old_logprobs[dest] = t.old_logprob;
    if (a.out_ref_logprobs) a.out_ref_logprobs[dest] = t.ref_logprob;
    a.out_seq_ids[dest] = t.seq_id;
}

// Segment s < R is response s's segment [p_{P-1}, r_s[0..L-1]]; s >= R is the prompt body
// [p_0..p_{P-2}] of group s - R. Writes positions first, first + stride, ... of that segment.
__host__ __device__ inline void pack_segment(const R4bPackArgs& a, int64_t s, int64_t first, int64_t stride) {
    if (s < a.num_responses) {
        const int64_t g = a.group_index[s], len = a.response_lengths[s], start = a.response_starts[s];
        const int64_t last = a.prompt_offsets[g + 1] - 1;  // the repeated last prompt token
        const int64_t* tokens = a.responses + s * a.max_len;
        for (int64_t j = first; j <= len; j += stride) {
            Token t{j == 0 ? a.prompt_tokens[last] : tokens[j - 1], last - a.prompt_offsets[g] + j,
                    static_cast<int32_t>(a.segment_index[s])};
            if (j < len) {  // position j predicts the response's token j
                t.target = tokens[j];
                t.advantage = a.advantages[s];
                if (a.old_logprobs) t.old_logprob = a.old_logprobs[s * a.max_len + j];
                if (a.ref_logprobs) t.ref_logprob = a.ref_logprobs[s * a.max_len + j];
                t.seq_id = s;
            }
            store(a, start + j, t);
        }
    } else {
        const int64_t g = s - a.num_responses, begin = a.prompt_offsets[g];
        const int64_t body = a.prompt_offsets[g + 1] - begin - 1;
        for (int64_t i = first; i < body; i += stride) {
            store(a, a.doc_starts[g] + i, Token{a.prompt_tokens[begin + i], i, 0});
        }
    }
}

__global__ void __launch_bounds__(kThreads) pack_kernel(const R4bPackArgs a) {
    pack_segment(a, blockIdx.x, int64_t(blockIdx.y) * blockDim.x + threadIdx.x, int64_t(gridDim.y) * blockDim.x);
}

// Response r's rows of out: its len rows of values (contiguous from response_starts[r]), then zeros up
// to max_len. Writes words first, first + stride, ... of them.
template <typename Word>
__host__ __device__ inline void unpack_response(const Word* values, Word* out, const int64_t* starts,
                                                const int64_t* lengths, int64_t max_len, int64_t row_words,
                                                int64_t r, int64_t first, int64_t stride) {
    const Word* src = values + starts[r] * row_words;
    Word* dst = out + r * max_len * row_words;
    const int64_t valid = lengths[r] * row_words, total = max_len * row_words;
    for (int64_t e = first; e < total; e += stride) dst[e] = e < valid ? src[e] : Word{};
}

template <typename Word>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const Word* values, Word* out, const int64_t* starts, const int64_t* lengths, int64_t max_len,
                  int64_t row_words) {
    unpack_response(values, out, starts, lengths, max_len, row_words, blockIdx.x,
                    int64_t(blockIdx.y) * blockDim.x + threadIdx.x, int64_t(gridDim.y) * blockDim.x);
}

// Any dtype is copied as raw words: the widest (16, 8, 4, 2 or 1 bytes) that divides a row and
// aligns both buffers. Returns f(Word{}) for that word type.
template <typename F>
auto with_word_type(const void* a, const void* b, int64_t row_bytes, F&& f) {
    const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
    const auto fits = [&](int64_t w) { return row_bytes % w == 0 && pa % w == 0 && pb % w == 0; };
    if (fits(16)) return f(uint4{});
    if (fits(8)) return f(uint64_t{});
    if (fits(4)) return f(uint32_t{});
    if (fits(2)) return f(uint16_t{});
    return f(uint8_t{});
}

}  // namespace

extern "C" cudaError_t r4b_pack_shared_prefix(const R4bPackArgs* args, cudaStream_t stream) {
    const int64_t segments = args->num_responses + args->num_groups;
    if (segments == 0) return cudaSuccess;
    if (segments > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x
    pack_kernel<<<dim3(static_cast<unsigned>(segments), grid_y(args->max_segment_len)), kThreads, 0, stream>>>(*args);
    return cudaGetLastError();
}

extern "C" cudaError_t r4b_unpack_responses(const void* values, void* out, const int64_t* response_starts,
                                            const int64_t* response_lengths, int64_t num_responses, int64_t max_len,
                                            int64_t row_bytes, cudaStream_t stream) {
    if (num_responses == 0 || max_len == 0 || row_bytes == 0) return cudaSuccess;
    if (num_responses > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x
    return with_word_type(values, out, row_bytes, [&](auto word) {
        using Word = decltype(word);
        const int64_t row_words = row_bytes / int64_t(sizeof(Word));
        unpack_kernel<Word><<<dim3(static_cast<unsigned>(num_responses), grid_y(max_len * row_words)), kThreads, 0,
                              stream>>>(static_cast<const Word*>(values), static_cast<Word*>(out), response_starts,
                                        response_lengths, max_len, row_words);
        return cudaGetLastError();
    });
}
