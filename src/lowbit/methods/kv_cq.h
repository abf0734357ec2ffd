// Codebook learning for Coupled Quantization of the KV cache (issue 16; Zhang et al. 2024, "KV Cache
// is 1 Bit Per Channel", arXiv 2405.03917; the codec is ops/coupled_quant.h, the attention path
// model/rotation.h KVQuantSpec).
//
// For every layer, keys and values separately, and every group of c contiguous channels (of the
// KVH * head_dim channels of a token, after RoPE — what the cache holds), the 2^b centroids are
// learned by k-means (Lloyd's algorithm, k-means++ seeding) on that group's c-dimensional vectors
// from calibration windows run through the model. Plain (unweighted) k-means: the paper's
// Fisher-guided centroid learning (weighting each vector by the squared gradient of the loss
// with respect to it) is not done here; kmeans() takes per-point weights, so it could be added.
//
// The model runs block by block over all windows (hidden states of every window kept, one block
// at a time), so only one layer's keys/values are held at once.
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/llama.h"

namespace lowbit {

struct KMeansOptions {
  int max_iters = 20;  // Lloyd iterations at most (stops earlier when no assignment changes)
  uint64_t seed = 0;   // k-means++ seeding
};

struct KMeansResult {
  Tensor centroids;                // f32 [k, c]
  std::vector<int64_t> assignment;  // nearest centroid of each point (ops::cq_nearest)
  // The objective sum_i w_i ||x_i - centroid(a_i)||^2 (f64): objective[0] after seeding and
  // assignment, then after each iteration's centroid update and re-assignment (non-increasing).
  std::vector<double> objective;
  int iterations = 0;  // Lloyd updates run
};

// k-means of x f32 [N, c] (CPU) into k centroids (1 <= k <= 256, N >= 1). weights: empty, or f64/f32
// [N], non-negative (weighted k-means: a centroid is the weighted mean of its points). A centroid
// that loses all its points keeps its place. With fewer distinct points than k, the extra
// centroids repeat points.
KMeansResult kmeans(const Tensor& x, int64_t k, const KMeansOptions& o = {}, const Tensor& weights = Tensor());

struct KVCodebookOptions {
  int channels = 8;           // c
  int code_bits = 8;          // b: 2^b centroids a group
  int64_t max_points = 16384;  // vectors per group at most (an even stride over the calibration tokens)
  KMeansOptions kmeans;
  // Round the centroids to f16 (the CQ paper's codebooks; the checkpoint then stores them in f16, half
  // the bytes): the codes are chosen against the rounded centroids, and the reported error is theirs.
  // false: f32 centroids (the rows of docs/results/kv-cq.md before 2026-12-08).
  bool f16 = true;
};

struct KVCodebookReport {
  Tensor keys, values;  // f32 [n_layers, KVH*hd/c, 2^b, c] (f16-representable values with KVCodebookOptions::f16)
  // Relative quantization error ||x - Q(x)||^2 / ||x||^2 on the points used, per layer.
  std::vector<double> key_rel_error, value_rel_error;
  int64_t points = 0;  // vectors per group
  double seconds = 0;
};

// Runs `tokens` (i32 [N, T] calibration windows) through the model (no gradients; whatever KV
// quantization it has is switched off while it runs) and learns every codebook. The model must be on
// the CPU; head_dim must be a multiple of o.channels.
KVCodebookReport learn_kv_codebooks(LlamaModel& model, const Tensor& tokens, const KVCodebookOptions& o = {});

}  // namespace lowbit
