// DeepSeek-V3 routing on the CPU: one token per iteration (OpenMP over tokens), the arithmetic and tie rules
// of route.h shared with the CUDA kernel.
#include <algorithm>
#include <limits>
#include <vector>

#include "moe/route.h"

namespace r1k {

void route_cpu(const void* logits, DType dtype, const float* bias, const RouteProblem& p, float* weights,
               int32_t* ids) {
  const int64_t E = p.experts, per_group = p.experts / p.n_group;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    std::vector<float> score(E), choice(E), group_score(p.n_group);
    std::vector<char> group_kept(p.n_group), taken(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = t * E + e;
        score[e] = dtype == DType::kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(logits)[i])
                                             : static_cast<const float*>(logits)[i];
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
      if (p.n_group > 1) {
        for (int64_t g = 0; g < p.n_group; ++g) {
          TopTwo two{neg_inf, neg_inf};
          for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) two.push(choice[e]);
          group_score[g] = two.first + two.second;
          group_kept[g] = 0;
        }
        for (int64_t r = 0; r < p.topk_group; ++r) {
          int64_t best = -1;
          for (int64_t g = 0; g < p.n_group; ++g)
            if (!group_kept[g] && (best < 0 || ranks_before(group_score[g], g, group_score[best], best))) best = g;
          group_kept[best] = 1;
        }
        for (int64_t e = 0; e < E; ++e)
          if (!group_kept[e / per_group]) choice[e] = neg_inf;
      }
      float chosen_sum = 0.0f;
      std::fill(taken.begin(), taken.end(), 0);
      for (int64_t r = 0; r < p.top_k; ++r) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || ranks_before(choice[e], e, choice[best], best))) best = e;
        taken[best] = 1;
        ids[t * p.top_k + r] = static_cast<int32_t>(best);
        chosen_sum += score[best];
      }
      for (int64_t r = 0; r < p.top_k; ++r)
        weights[t * p.top_k + r] = route_weight(score[ids[t * p.top_k + r]], chosen_sum, p);
    }
  }
}

}  // namespace r1k
