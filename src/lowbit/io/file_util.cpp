#include "lowbit/io/file_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <mutex>
#include <utility>
#include <vector>

#include "lowbit/core/vecmath.h"

namespace lowbit::io {

std::string display_name(const std::string& path) { return path; }

void pread_exact(const std::string& path, uint64_t offset, uint64_t n, void* dst, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_error(path, ": cannot open: ", std::strerror(errno));
  uint8_t* d = static_cast<uint8_t*>(dst);
  uint64_t at = offset;
  while (n > 0) {
    const ssize_t r = ::pread(fd, d, size_t(std::min<uint64_t>(n, 1u << 30)), off_t(at));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int e = errno;
      ::close(fd);
      throw_error(path, ": reading ", what, " at offset ", at, " failed: ", r == 0 ? "the file ends there (truncated?)" : std::strerror(e));
    }
    d += r, at += uint64_t(r), n -= uint64_t(r);
  }
  ::close(fd);
}

// ---- MappedFile ------------------------------------------------------------------------------
namespace {
// The live mappings (release_mapped_pages touches only those).
std::mutex g_maps_mu;
std::vector<std::pair<const uint8_t*, size_t>> g_maps;
}  // namespace

bool release_mapped_pages(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    bool inside = false;
    for (const auto& [d, sz] : g_maps) inside = inside || (b >= d && b + n <= d + sz);
    if (!inside) return false;
  }
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(b) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(b) + n) / page * page;
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  return true;
}

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_error(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw_error(path, ": cannot stat: ", std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_error(path, ": not a regular file");
  }
  std::shared_ptr<MappedFile> m(new MappedFile());
  m->path_ = path;
  m->size_ = size_t(st.st_size);
  if (m->size_ > 0) {
    // MAP_PRIVATE + PROT_READ: we never write through the mapping. The readers copy tensor data
    // into owned, aligned storage, so the mapping lives only as long as a load takes.
    void* p = ::mmap(nullptr, m->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw_error(path, ": cannot memory-map ", m->size_, " bytes: ", std::strerror(e));
    }
    ::madvise(p, m->size_, MADV_SEQUENTIAL);
    m->data_ = static_cast<const uint8_t*>(p);
    std::lock_guard<std::mutex> lock(g_maps_mu);
    g_maps.emplace_back(m->data_, m->size_);
  }
  ::close(fd);  // the mapping stays valid after close (POSIX mmap)
  return m;
}

MappedFile::~MappedFile() {
  if (data_) {
    std::lock_guard<std::mutex> lock(g_maps_mu);
    g_maps.erase(std::find(g_maps.begin(), g_maps.end(), std::make_pair(data_, size_)));
  }
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

// ---- checked arithmetic ---------------------------------------------------------------------
uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& source, const char* what) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw_error(source, ": size of ", what, " overflows 64 bits (", a, " * ", b, ")");
  return r;
}
uint64_t checked_add(uint64_t a, uint64_t b, const std::string& source, const char* what) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw_error(source, ": size of ", what, " overflows 64 bits (", a, " + ", b, ")");
  return r;
}

// ---- AtomicFileWriter -----------------------------------------------------------------------
AtomicFileWriter::AtomicFileWriter(const std::string& path) : path_(path), tmp_path_(path + ".tmp") {
  f_ = std::fopen(tmp_path_.c_str(), "wb");
  if (!f_) throw_error(tmp_path_, ": cannot create: ", std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (f_) std::fclose(f_);
  if (!committed_) std::remove(tmp_path_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t n) {
  if (committed_ || !f_) throw_error(path_, ": write after commit");
  if (n == 0) return;
  if (std::fwrite(data, 1, n, f_) != n) throw_error(tmp_path_, ": write failed after ", written_, " bytes: ", std::strerror(errno));
  written_ += n;
}

void AtomicFileWriter::write_zeros(size_t n) {
  static const char zeros[256] = {};
  while (n > 0) {
    size_t k = n < sizeof(zeros) ? n : sizeof(zeros);
    write(zeros, k);
    n -= k;
  }
}

void AtomicFileWriter::commit() {
  if (committed_ || !f_) throw_error(path_, ": commit called twice");
  // fflush + fsync before rename: otherwise a crash can leave `path` naming an empty or partial
  // file on filesystems that reorder metadata and data writes.
  if (std::fflush(f_) != 0) throw_error(tmp_path_, ": flush failed: ", std::strerror(errno));
  if (::fsync(::fileno(f_)) != 0) throw_error(tmp_path_, ": fsync failed: ", std::strerror(errno));
  int rc = std::fclose(f_);
  f_ = nullptr;
  if (rc != 0) throw_error(tmp_path_, ": close failed: ", std::strerror(errno));
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    throw_error(path_, ": cannot rename ", tmp_path_, " over it: ", std::strerror(errno));
  committed_ = true;
  // Make the rename itself durable (best effort: some filesystems refuse fsync on directories).
  std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  if (dir.empty()) dir = std::filesystem::current_path();
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

void refuse_to_overwrite(const std::string& input, const std::string& output) {
  if (same_file(input, output))
    throw_error(output, ": refusing to overwrite the input checkpoint ", input, "; choose another output path");
}

bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return false;
    if (n - i < size_t(len)) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += size_t(len);
  }
  return true;
}

// ---- element conversion -------------------------------------------------------------------------
template <class T>
static void convert_as(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, src + size_t(i) * sizeof(T), sizeof(T));
    dst[i] = float(v);
  }
}

void convert_to_f32(const uint8_t* src, DType dtype, int64_t n, float* dst) {
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::F16:
      if (reinterpret_cast<uintptr_t>(src) % alignof(uint16_t) == 0) {  // F16C/AVX-512 (core/vecmath.h)
        vec::f16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
        return;
      }
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * size_t(i), 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * size_t(i), 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case DType::F64: convert_as<double>(src, n, dst); return;
    case DType::I8: convert_as<int8_t>(src, n, dst); return;
    case DType::U8: convert_as<uint8_t>(src, n, dst); return;
    case DType::I16: convert_as<int16_t>(src, n, dst); return;
    case DType::I32: convert_as<int32_t>(src, n, dst); return;
    case DType::I64: convert_as<int64_t>(src, n, dst); return;
  }
  throw_error("convert_to_f32: unsupported dtype ", int(dtype));
}

Tensor tensor_from_bytes_f32(const uint8_t* src, DType dtype, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::F32);
  if (t.numel() > 0) convert_to_f32(src, dtype, t.numel(), t.data<float>());
  return t;
}

}  // namespace lowbit::io
