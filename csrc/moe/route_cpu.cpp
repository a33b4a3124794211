// DeepSeek-V3 routing on the CPU: one token per iteration (OpenMP over tokens), the arithmetic and tie rules
// of route.h shared with the CUDA kernel. Scores in branch-free loops (vectorized); each selection round is
// an arg-max over integer rank keys (rank_key: ranks_before as one comparison), branch-free, so random
// scores cost no mispredictions.
#include <cmath>
#include <limits>
#include <vector>

#include "moe/route.h"

namespace r1k {
namespace {

// The slot of the largest key among keys[0, n), then spent (set to 0); branch-free.
inline int64_t take_best(uint64_t* keys, int64_t n) {
  uint64_t best = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool better = keys[i] > best;
    best = better ? keys[i] : best;
    at = better ? i : at;
  }
  keys[at] = 0;
  return at;
}

struct TokenScratch {
  std::vector<float> score, choice, first, second;
  std::vector<uint64_t> group_keys, keys;
  std::vector<int32_t> key_expert, kept;
  explicit TokenScratch(const RouteProblem& p)
      : score(p.experts), choice(p.experts), first(p.n_group), second(p.n_group), group_keys(p.n_group),
        keys(p.experts), key_expert(p.experts), kept(p.topk_group) {}
};

// One token. Compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (the CPU differs between
// machines): the score loops vectorize to the widest the machine has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void route_token(const void* logits, DType dtype, const float* bias, const RouteProblem& p, int64_t t,
                 TokenScratch& s, float* weights, int32_t* ids) {
  const int64_t E = p.experts, G = p.n_group, per_group = p.experts / p.n_group, k = p.top_k;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* score = s.score.data();
  float* choice = s.choice.data();
  if (dtype == DType::kBFloat16) {
    const uint16_t* row = static_cast<const uint16_t*>(logits) + t * E;
    for (int64_t e = 0; e < E; ++e) score[e] = bf16_to_float(row[e]);
  } else {
    const float* row = static_cast<const float*>(logits) + t * E;
    for (int64_t e = 0; e < E; ++e) score[e] = row[e];
  }
  if (p.softmax) {
    float mx = neg_inf;
    for (int64_t e = 0; e < E; ++e) mx = score[e] > mx ? score[e] : mx;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(score[e] - mx));
    for (int64_t e = 0; e < E; ++e) score[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) score[e] = sigmoid(score[e]);
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = score[e] + (bias ? bias[e] : 0.0f);

  int64_t groups = 1;  // kept groups (all experts form one when n_group == 1)
  s.kept[0] = 0;
  if (G > 1) {
    // each group's two best biased scores, branch-free (TopTwo's rule: NaN never enters)
    float* first = s.first.data();
    float* second = s.second.data();
    for (int64_t g = 0; g < G; ++g) first[g] = second[g] = neg_inf;
    for (int64_t j = 0; j < per_group; ++j)
      for (int64_t g = 0; g < G; ++g) {
        float v = choice[g * per_group + j];
        v = v != v ? neg_inf : v;
        const float lo = v < first[g] ? v : first[g];
        first[g] = v > first[g] ? v : first[g];
        second[g] = lo > second[g] ? lo : second[g];
      }
    for (int64_t g = 0; g < G; ++g) s.group_keys[g] = rank_key(first[g] + second[g], static_cast<uint32_t>(g));
    groups = p.topk_group;
    for (int64_t r = 0; r < groups; ++r) s.kept[r] = static_cast<int32_t>(take_best(s.group_keys.data(), G));
  }
  int64_t n = 0;
  for (int64_t gi = 0; gi < groups; ++gi)
    for (int64_t e = s.kept[gi] * per_group; e < (s.kept[gi] + 1) * per_group; ++e, ++n) {
      s.keys[n] = rank_key(choice[e], static_cast<uint32_t>(e));
      s.key_expert[n] = static_cast<int32_t>(e);
    }
  float chosen_sum = 0.0f;
  for (int64_t r = 0; r < k; ++r) {
    const int32_t e = s.key_expert[take_best(s.keys.data(), n)];
    ids[t * k + r] = e;
    chosen_sum += score[e];
  }
  for (int64_t r = 0; r < k; ++r) weights[t * k + r] = route_weight(score[ids[t * k + r]], chosen_sum, p);
}

}  // namespace

void route_cpu(const void* logits, DType dtype, const float* bias, const RouteProblem& p, float* weights,
               int32_t* ids) {
#pragma omp parallel
  {
    TokenScratch scratch(p);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) route_token(logits, dtype, bias, p, t, scratch, weights, ids);
  }
}

}  // namespace r1k
