// The scope of a KV-cache calibration pass (Coupled Quantization's codebooks, WKVQuant's smoothing):
// such a pass swaps the model's transforms and installs a KV observer; leaving the scope, also by an
// exception, clears the observer and puts the transforms back.
#pragma once

#include "lowbit/model/llama.h"

namespace lowbit {

class KvCalibrationScope {
 public:
  explicit KvCalibrationScope(LlamaModel& model) : model_(model), saved_(model.transforms()) {}
  ~KvCalibrationScope() {
    model_.set_kv_observer({});
    model_.set_transforms(saved_);
  }
  KvCalibrationScope(const KvCalibrationScope&) = delete;
  KvCalibrationScope& operator=(const KvCalibrationScope&) = delete;
  // The transforms the model had when the scope began (restored at its end).
  const ModelTransforms& saved() const { return saved_; }

 private:
  LlamaModel& model_;
  ModelTransforms saved_;
};

}  // namespace lowbit
