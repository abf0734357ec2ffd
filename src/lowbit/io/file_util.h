// Low-level file helpers shared by the checkpoint readers and writers:
//  * MappedFile: a read-only memory map of a whole file (the readers parse headers in place and
//    copy tensor data out of it, every access bounds-checked against the mapped size);
//  * ByteReader: a little-endian cursor over a byte range that throws lowbit::Error naming the
//    file and offset instead of reading past the end;
//  * AtomicFileWriter: writes `path.tmp`, fsyncs, renames over `path`; on any error (or when
//    destroyed without commit()) the temporary is removed and `path` is left untouched.
#pragma once
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <string_view>

#include "lowbit/core/error.h"
#include "lowbit/core/tensor.h"

namespace lowbit::io {

// All formats read here (llama2.c, safetensors, GGUF) are little-endian; so is every host we
// build for. Refuse to build elsewhere rather than silently misread files.
static_assert(std::endian::native == std::endian::little, "lowbit io assumes a little-endian host");

// Display name of a path for error messages: the path as given.
std::string display_name(const std::string& path);

class MappedFile {
 public:
  // Maps `path` read-only. Throws lowbit::Error naming the path if it cannot be opened, is not a
  // regular file, or cannot be mapped. An empty file maps to size() == 0, data() == nullptr.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Drops this process's resident pages of the whole pages inside [p, p + n) when the range lies in a
// live MappedFile (madvise MADV_DONTNEED: a private read-only file mapping reads them from the file
// again if they are touched later, so nothing changes but the resident size); returns false and
// does nothing otherwise. For callers that copy mapped bytes into memory of their own and stop
// reading the mapping (cli's load_model: the panel layout of GGUF weights).
bool release_mapped_pages(const void* p, size_t n);

// Overflow-checked size arithmetic: throws lowbit::Error "<source>: <what> overflows".
uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& source, const char* what);
uint64_t checked_add(uint64_t a, uint64_t b, const std::string& source, const char* what);

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size, std::string source)
      : data_(data), size_(size), source_(std::move(source)) {}

  size_t pos() const { return pos_; }
  size_t size() const { return size_; }
  size_t remaining() const { return size_ - pos_; }
  const std::string& source() const { return source_; }
  void seek(size_t pos) {
    if (pos > size_) throw_error(source_, ": offset ", pos, " is past the end of the file (", size_, " bytes)");
    pos_ = pos;
  }

  // Returns a pointer to the next n bytes and advances; throws if fewer remain. `what` names the
  // field being read for the error message.
  const uint8_t* take(uint64_t n, const char* what) {
    if (n > remaining())
      throw_error(source_, ": truncated file: reading ", what, " at offset ", pos_, " needs ", n, " bytes, only ",
                  remaining(), " remain (file is ", size_, " bytes)");
    const uint8_t* p = data_ + pos_;
    pos_ += size_t(n);
    return p;
  }
  template <class T>
  T read(const char* what) {
    static_assert(std::is_trivially_copyable_v<T>);
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string_view read_bytes(uint64_t n, const char* what) {
    const uint8_t* p = take(n, what);
    return std::string_view(reinterpret_cast<const char*>(p), size_t(n));
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string source_;
};

class AtomicFileWriter {
 public:
  // Creates `path.tmp` (truncating a stale one). Throws naming the path on failure.
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();  // removes the temporary unless commit() succeeded
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t n);
  template <class T>
  void write_pod(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    write(&v, sizeof(T));
  }
  void write_zeros(size_t n);
  uint64_t bytes_written() const { return written_; }
  // Flushes, fsyncs, renames the temporary over `path` and fsyncs the directory.
  void commit();
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_path_;
  std::FILE* f_ = nullptr;
  uint64_t written_ = 0;
  bool committed_ = false;
};

// Reads bytes [offset, offset + n) of the file `path` into dst with pread (not through a mapping:
// the pages stay in the page cache, not in this process's resident memory). Throws naming the file
// and `what` when it cannot be opened or is shorter.
void pread_exact(const std::string& path, uint64_t offset, uint64_t n, void* dst, const std::string& what);

// True when both paths name the same existing file (same device and inode).
bool same_file(const std::string& a, const std::string& b);

// Throws if `path` (after following links) names the same file as `input`: a converter must never
// write over the checkpoint it reads.
void refuse_to_overwrite(const std::string& input, const std::string& output);

// True when `s` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool valid_utf8(std::string_view s);

// Converts `n` little-endian elements of `dtype` at `src` (any alignment) to f32.
void convert_to_f32(const uint8_t* src, DType dtype, int64_t n, float* dst);

// Copies `n` elements of `dtype` from a (possibly unaligned) byte range into a new owned,
// contiguous f32 CPU tensor of `shape`.
Tensor tensor_from_bytes_f32(const uint8_t* src, DType dtype, const Shape& shape);

}  // namespace lowbit::io
