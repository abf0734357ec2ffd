// safetensors files (https://github.com/huggingface/safetensors, README "Format"):
//   u64 N (little-endian)            size of the header
//   N bytes of UTF-8 JSON            {"name": {"dtype": "F16", "shape": [..], "data_offsets": [b, e]},
//                                     ..., "__metadata__": {"k": "v", ...}}  (may be padded with
//                                     trailing spaces; the reference writer pads to 8 bytes)
//   the byte buffer                  offsets [b, e) are relative to its start
// The reference implementation rejects headers over 100 MB, overlapping tensors, holes between
// tensors and bytes after the last tensor; so do we (an error names the file and tensor).
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit {

namespace io {
class MappedFile;
}

struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype_name;      // as in the file: "F32", "BF16", ...
  std::optional<DType> dtype;  // empty for dtypes lowbit cannot hold (BOOL, U16, F8_E4M3, ...)
  int element_size = 0;        // bytes
  Shape shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the byte buffer
};

class SafetensorsFile {
 public:
  // Maps and validates the file; throws lowbit::Error naming it and the problem.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }  // in file order
  const SafetensorsTensorInfo* find(const std::string& name) const;  // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A copy of the tensor in its own dtype (throws for dtypes lowbit cannot hold).
  Tensor load(const std::string& name) const;
  // The tensor's bytes in place (zero copy: the tensor keeps the mapping alive; read-only memory,
  // never write to it). Falls back to load() when the data is not aligned to its element size.
  Tensor map(const std::string& name) const;
  // A copy converted to f32.
  Tensor load_f32(const std::string& name) const;
  // Elements [first, first + count) of the tensor (in row-major order) converted to f32 into dst,
  // read with pread in chunks, not through the mapping: the file's pages never become part of this
  // process's resident memory (block-wise streaming, methods/stream.h, reads a 70B model this way).
  void read_f32(const std::string& name, int64_t first, int64_t count, float* dst) const;
  // The whole tensor as f32, read as read_f32 above.
  Tensor read_f32(const std::string& name) const;
  // The tensor's bytes [offset, offset + n) as stored, read with pread into dst.
  void read_bytes(const std::string& name, uint64_t offset, uint64_t n, void* dst) const;

 private:
  const SafetensorsTensorInfo& get(const std::string& name) const;
  const uint8_t* bytes_of(const SafetensorsTensorInfo& t) const;
  std::string path_;
  std::shared_ptr<io::MappedFile> file_;
  uint64_t data_start_ = 0;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any dtype, any device/layout; written contiguous) in the given order, with
// `metadata` as __metadata__. Atomic: path.tmp, fsync, rename. Names must be unique, valid UTF-8
// and not "__metadata__".
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A tensor written by save_safetensors_streamed: its data comes from `write`, which must hand
// `out` exactly numel(shape) * dtype_size(dtype) bytes, in order, in pieces of any size.
struct SafetensorsStreamEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::function<void(const std::function<void(const void*, size_t)>& out)> write;
};
// save_safetensors for data that is never held whole (the quantized output of block-wise
// streaming, assembled from per-block part files): the same header, byte for byte, as
// save_safetensors writes for tensors of these names, dtypes and shapes in this order. Atomic.
void save_safetensors_streamed(const std::string& path, const std::vector<SafetensorsStreamEntry>& entries,
                               const std::map<std::string, std::string>& metadata = {});

// The safetensors dtype string for a lowbit dtype ("F32", "BF16", ...).
const char* safetensors_dtype_name(DType t);

// True when the file starts like a safetensors file (plausible header length, then '{').
bool looks_like_safetensors(const std::string& path);

}  // namespace lowbit
