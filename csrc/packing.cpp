// Packing planner: best-fit-decreasing micro-batches and Karmarkar-Karp balanced partitions.
//
// r4b/packing.py holds a pure-Python twin of each function and the documented API. The two must return
// identical results, so every order and tie-break here is spelled out and mirrored there; change both.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <queue>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace r4b {
namespace {

using Lengths = std::vector<int64_t>;
using Groups = std::vector<std::vector<int64_t>>;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

void check_non_negative(const Lengths& lengths) {
    for (size_t i = 0; i < lengths.size(); ++i) {
        if (lengths[i] < 0) {
            throw std::invalid_argument("sample " + std::to_string(i) + " has a negative length (" +
                                        std::to_string(lengths[i]) + ")");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Best-fit decreasing
// ---------------------------------------------------------------------------------------------------

Groups best_fit_decreasing(const Lengths& lengths, int64_t max_tokens) {
    std::vector<int64_t> order(lengths.size());
    std::iota(order.begin(), order.end(), 0);
    // Stable: equal lengths keep index order.
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

    Groups bins;
    // (room left, bin id), ordered: the first entry with room >= length is the best fit, and among equal
    // rooms the earliest-opened bin. Entries are unique, so a set is the multiset of the textbook version.
    std::set<std::pair<int64_t, int64_t>> rooms;
    for (int64_t item : order) {
        const int64_t length = lengths[item];
        auto fit = rooms.lower_bound({length, 0});
        if (fit == rooms.end()) {
            rooms.emplace(max_tokens - length, static_cast<int64_t>(bins.size()));
            bins.push_back({item});
            continue;
        }
        const auto [room, bin] = *fit;
        rooms.erase(fit);
        rooms.emplace(room - length, bin);
        bins[bin].push_back(item);
    }
    return bins;
}

Groups plan_micro_batches(const Lengths& lengths, int64_t max_tokens) {
    if (max_tokens <= 0) {
        throw std::invalid_argument("max_tokens must be positive, got " + std::to_string(max_tokens));
    }
    check_non_negative(lengths);
    for (size_t i = 0; i < lengths.size(); ++i) {
        if (lengths[i] > max_tokens) {
            throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                                        " tokens, over the budget of " + std::to_string(max_tokens));
        }
    }
    py::gil_scoped_release no_gil;  // pure C++ from here: let data-loader threads run
    return best_fit_decreasing(lengths, max_tokens);
}

// ---------------------------------------------------------------------------------------------------
// Karmarkar-Karp (largest differencing) k-way partition
// ---------------------------------------------------------------------------------------------------

double cost_of(int64_t tokens, int64_t squares, double attention_weight) {
    // volatile keeps the compiler from fusing this into an FMA (one rounding instead of Python's two),
    // which would break exact agreement with the Python twin on FMA targets such as aarch64.
    volatile double attention = attention_weight * static_cast<double>(squares);
    return static_cast<double>(tokens) + attention;
}

// One partition under construction. Its items are a linked list threaded through KarmarkarKarp::next_,
// so merging two partitions is O(1).
struct Part {
    double cost;
    int64_t first;  // smallest item index: unique across parts, the deterministic tie-break
    int64_t tokens;
    int64_t squares;  // sum of squared lengths; 0 when attention_weight is 0
    int64_t head;
    int64_t tail;
};

// Heaviest first; equal costs by smallest first index.
bool heavier(const Part& a, const Part& b) { return a.cost != b.cost ? a.cost > b.cost : a.first < b.first; }

// A state is a k-way partial partition of some items: its non-empty parts sorted by `heavier`, the
// k - size() empty parts implied after them (they have cost 0 and no first index, so they sort last).
using State = std::vector<Part>;

class KarmarkarKarp {
  public:
    KarmarkarKarp(const Lengths& lengths, int64_t k, double attention_weight, bool equal_size)
        : lengths_(lengths), k_(k), weight_(attention_weight), next_(lengths.size(), -1) {
        const int64_t n = static_cast<int64_t>(lengths.size());
        if (!equal_size) {
            for (int64_t i = 0; i < n; ++i) push(State{single(i)});
            return;
        }
        // One part per item over groups of k consecutive lengths (ascending, ties by index): every merge
        // then adds exactly one item to each part, so all parts end with n / k items.
        std::vector<int64_t> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] < lengths[b]; });
        for (int64_t start = 0; start < n; start += k) {
            State state;
            for (int64_t j = start; j < start + k; ++j) state.push_back(single(order[j]));
            std::sort(state.begin(), state.end(), heavier);
            push(std::move(state));
        }
    }

    Groups run() {
        if (heap_.empty()) return Groups(k_);
        while (heap_.size() > 1) {
            const Entry a = heap_.top();
            heap_.pop();
            const Entry b = heap_.top();
            heap_.pop();
            push(merge(states_[a.state], states_[b.state]));
            State().swap(states_[a.state]);  // free what was merged
            State().swap(states_[b.state]);
        }
        return groups(states_[heap_.top().state]);
    }

  private:
    struct Entry {
        double spread;
        int64_t first;  // smallest item index in the state: unique, so pops are fully ordered
        size_t state;
    };
    // std::priority_queue pops the greatest: the largest spread, then the smallest first index.
    struct PopsLater {
        bool operator()(const Entry& a, const Entry& b) const {
            return a.spread != b.spread ? a.spread < b.spread : a.first > b.first;
        }
    };

    Part single(int64_t item) const {
        const int64_t length = lengths_[item];
        const int64_t squares = weight_ > 0.0 ? length * length : 0;
        return Part{cost_of(length, squares, weight_), item, length, squares, item, item};
    }

    double spread(const State& state) const {
        const double lightest = static_cast<int64_t>(state.size()) == k_ ? state.back().cost : 0.0;
        return state.front().cost - lightest;
    }

    void push(State state) {
        int64_t first = state.front().first;
        for (const Part& part : state) first = std::min(first, part.first);
        heap_.push(Entry{spread(state), first, states_.size()});
        states_.push_back(std::move(state));
    }

    // Differencing step: the i-th heaviest part of `a` takes the i-th lightest of `b`.
    State merge(const State& a, const State& b) {
        const int64_t na = static_cast<int64_t>(a.size());
        const int64_t nb = static_cast<int64_t>(b.size());
        State merged;
        merged.reserve(std::min<int64_t>(na + nb, k_));
        const auto take = [&](int64_t i) {
            const int64_t j = k_ - 1 - i;
            if (i < na && j < nb) {
                merged.push_back(join(a[i], b[j]));
            } else {
                merged.push_back(i < na ? a[i] : b[j]);
            }
        };
        // Only positions where a or b has a non-empty part: [0, na) and [k - nb, k).
        for (int64_t i = 0; i < na; ++i) take(i);
        for (int64_t i = std::max(na, k_ - nb); i < k_; ++i) take(i);
        std::sort(merged.begin(), merged.end(), heavier);
        return merged;
    }

    Part join(const Part& x, const Part& y) {
        next_[x.tail] = y.head;
        const int64_t tokens = x.tokens + y.tokens;
        const int64_t squares = x.squares + y.squares;
        return Part{cost_of(tokens, squares, weight_), std::min(x.first, y.first), tokens, squares, x.head, y.tail};
    }

    Groups groups(const State& state) const {
        Groups out(k_);
        for (size_t p = 0; p < state.size(); ++p) {
            for (int64_t item = state[p].head; item != -1; item = next_[item]) out[p].push_back(item);
            std::sort(out[p].begin(), out[p].end());
        }
        return out;
    }

    const Lengths& lengths_;
    const int64_t k_;
    const double weight_;
    std::vector<int64_t> next_;
    std::vector<State> states_;
    std::priority_queue<Entry, std::vector<Entry>, PopsLater> heap_;
};

Groups balance_partitions(const Lengths& lengths, int64_t k, double attention_weight, bool equal_size) {
    if (k <= 0) throw std::invalid_argument("k must be positive, got " + std::to_string(k));
    if (!std::isfinite(attention_weight) || attention_weight < 0.0) {
        // str() of the Python float, so the message matches the Python implementation's.
        throw std::invalid_argument("attention_weight must be finite and non-negative, got " +
                                    std::string(py::str(py::float_(attention_weight))));
    }
    check_non_negative(lengths);
    const int64_t n = static_cast<int64_t>(lengths.size());
    if (equal_size && n % k != 0) {
        throw std::invalid_argument("equal_size needs the number of samples (" + std::to_string(n) +
                                    ") to be a multiple of k (" + std::to_string(k) + ")");
    }
    // Part sums are exact int64; refuse inputs whose totals would overflow rather than wrap.
    int64_t tokens = 0;
    int64_t squares = 0;
    for (int64_t length : lengths) {
        int64_t square = 0;
        bool overflow = __builtin_add_overflow(tokens, length, &tokens);
        if (attention_weight > 0.0) {
            overflow = overflow || __builtin_mul_overflow(length, length, &square) ||
                       __builtin_add_overflow(squares, square, &squares);
        }
        if (overflow) throw std::invalid_argument("lengths too large: their sums overflow 64-bit integers");
    }
    py::gil_scoped_release no_gil;
    return KarmarkarKarp(lengths, k, attention_weight, equal_size).run();
}

}  // namespace

void register_packing(py::module_& m) {
    m.def("plan_micro_batches", &plan_micro_batches, py::arg("lengths"), py::arg("max_tokens"),
          "Best-fit-decreasing bins of item indices; see r4b.packing.plan_micro_batches.");
    m.def("balance_partitions", &balance_partitions, py::arg("lengths"), py::arg("k"), py::kw_only(),
          py::arg("attention_weight") = 0.0, py::arg("equal_size") = false,
          "Karmarkar-Karp k-way partition of item indices; see r4b.packing.balance_partitions.");
}

}  // namespace r4b
