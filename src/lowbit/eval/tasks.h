// Zero-shot multiple-choice and cloze tasks in MosaicML llm-foundry's JSONL format
// (../shared/tasks/llm-foundry): ARC, PIQA, OpenBookQA, BoolQ, COPA, HellaSwag
// ({query, choices, gold}), WinoGrande ({context_options, continuation, gold}) and LAMBADA
// ({context, continuation}).
//
// Scoring follows lm-evaluation-harness: a continuation's score is the sum of its tokens'
// log-probabilities given the context, with the continuation's tokens taken from the encoding
// of context + continuation (so merges across the boundary are handled as the tokenizer does).
//   multiple choice:  acc = argmax_i score_i == gold; acc_norm divides score_i by the byte length
//                     of choice i; the continuation is delimiter + choice.
//   WinoGrande:       "partial evaluation": the shared continuation is scored after each context
//                     option; the best-scoring option is the prediction.
//   LAMBADA:          acc = every continuation token is the greedy argmax (context + " " + word).
#pragma once
#include <string>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace lowbit {

struct TaskOptions {
  int64_t limit = 0;             // evaluate at most this many rows (0 = all)
  std::string delimiter = " ";   // between query and choice
  bool bos = true;               // start with the tokens the tokenizer adds for specials (BOS where it has one)
  bool progress = true;
};

struct TaskResult {
  std::string task;
  std::string kind;  // multiple_choice | winogrande | lambada
  int64_t rows = 0;
  double acc = 0;
  double acc_norm = -1;  // multiple choice only
  double seconds = 0;
  // With KIVI fake quantization (ModelTransforms::kv): the mean, over every scored position, of the
  // fraction of the keys/values its query reads that are quantized (KVQuantSpec::quantized_len);
  // -1 when the model has none. Prompts shorter than the full-precision window give 0.
  double kv_quantized_fraction = -1;
};

// Evaluates one .jsonl file; the task name is the file's stem. Throws naming the file and line
// for rows that do not match a known schema.
TaskResult evaluate_task(const LlamaModel& model, const Tokenizer& tokenizer, const std::string& jsonl_path,
                         const TaskOptions& options);

}  // namespace lowbit
