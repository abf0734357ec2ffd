// Damaging a saved checkpoint on purpose, for the tests that check how a loader refuses a bad record:
// edits of config.json's quantization_config.transforms, and one tensor of model.safetensors changed
// or dropped.
#pragma once
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/core/tensor.h"
#include "lowbit/io/safetensors.h"

namespace lowbit::test {

// transforms[key] = value must make the loader fail with an error containing needle.
struct TransformEdit {
  const char* key;
  nlohmann::json value;
  const char* needle;
};

// Writes config.json (`cfg`) as `original` with each edit in turn and calls expect_error(needle);
// config.json holds `original` again afterwards.
inline void expect_transform_edits_refused(const std::string& cfg, const nlohmann::json& original,
                                           std::initializer_list<TransformEdit> edits,
                                           const std::function<void(const std::string&)>& expect_error) {
  for (const TransformEdit& e : edits) {
    auto bad = original;
    bad["quantization_config"]["transforms"][e.key] = e.value;
    std::ofstream(cfg) << bad.dump();
    expect_error(e.needle);
  }
  std::ofstream(cfg) << original.dump();
}

// A copy of every tensor of a safetensors file, taken once; rewrite() writes the file back with one
// tensor changed.
class SafetensorsSnapshot {
 public:
  explicit SafetensorsSnapshot(std::string path) : path_(std::move(path)) {
    SafetensorsFile f = SafetensorsFile::open(path_);
    for (const auto& t : f.tensors()) all_.emplace_back(t.name, f.load(t.name).clone());
  }
  // The file with tensor `name` replaced by change(tensor), or without it when `change` is empty;
  // rewrite("", {}) writes the original back.
  void rewrite(const std::string& name, const std::function<Tensor(const Tensor&)>& change) const {
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const auto& [n, t] : all_) {
      if (n != name) ts.emplace_back(n, t);
      else if (change) ts.emplace_back(n, change(t));
    }
    save_safetensors(path_, ts);
  }

 private:
  std::string path_;
  std::vector<std::pair<std::string, Tensor>> all_;
};

}  // namespace lowbit::test
