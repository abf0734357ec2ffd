#include "lowbit/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "lowbit/io/file_util.h"

namespace lowbit {

namespace {

using json = nlohmann::json;

// The reference implementation's limit (safetensors/src/tensor.rs MAX_HEADER_SIZE).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  const char* name;
  int size;
  std::optional<DType> dtype;
};
// Every dtype of the safetensors spec, so that files holding ones we cannot load can still be
// opened and their other tensors read.
constexpr DTypeEntry kDTypes[] = {
    {"F64", 8, DType::F64}, {"F32", 4, DType::F32},   {"F16", 2, DType::F16},   {"BF16", 2, DType::BF16},
    {"I64", 8, DType::I64}, {"I32", 4, DType::I32},   {"I16", 2, DType::I16},   {"I8", 1, DType::I8},
    {"U8", 1, DType::U8},   {"BOOL", 1, std::nullopt}, {"U16", 2, std::nullopt}, {"U32", 4, std::nullopt},
    {"U64", 8, std::nullopt}, {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
};

const DTypeEntry* find_dtype(const std::string& name) {
  for (const auto& e : kDTypes)
    if (name == e.name) return &e;
  return nullptr;
}

uint64_t json_u64(const json& v, const std::string& path, const std::string& what) {
  if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0))
    throw_error(path, ": ", what, " must be a non-negative integer, got ", v.dump());
  return v.get<uint64_t>();
}

}  // namespace

const char* safetensors_dtype_name(DType t) {
  for (const auto& e : kDTypes)
    if (e.dtype && *e.dtype == t) return e.name;
  throw_error("dtype ", dtype_name(t), " has no safetensors name");
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  f.file_ = io::MappedFile::open(path);
  const uint64_t size = f.file_->size();
  if (size < 8) throw_error(path, ": file is ", size, " bytes, too small for a safetensors header length (8 bytes)");
  uint64_t n;
  std::memcpy(&n, f.file_->data(), 8);
  if (n > size - 8)
    throw_error(path, ": safetensors header length ", n, " exceeds the file (", size, " bytes): truncated or not a safetensors file");
  if (n > kMaxHeaderBytes) throw_error(path, ": safetensors header length ", n, " exceeds the 100 MB limit of the format");
  if (n < 2 || f.file_->data()[8] != '{')
    throw_error(path, ": safetensors header does not start with '{': not a safetensors file");
  f.data_start_ = 8 + n;
  const uint64_t data_size = size - f.data_start_;

  const char* hb = reinterpret_cast<const char*>(f.file_->data() + 8);
  json header;
  std::set<std::string> keys;
  try {
    // Duplicate top-level keys would let two definitions of one tensor disagree; the JSON library
    // keeps the last one silently, so detect them while parsing.
    header = json::parse(hb, hb + n, [&](int depth, json::parse_event_t ev, json& parsed) {
      if (depth == 1 && ev == json::parse_event_t::key) {
        const auto& k = parsed.get_ref<const std::string&>();
        if (!keys.insert(k).second) throw_error(path, ": safetensors header has duplicate entry '", k, "'");
      }
      return true;
    });
  } catch (const json::exception& e) {
    throw_error(path, ": safetensors header is not valid JSON: ", e.what());
  }
  if (!header.is_object()) throw_error(path, ": safetensors header is not a JSON object");

  try {
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) throw_error(path, ": __metadata__ must be an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) throw_error(path, ": __metadata__ value '", m.key(), "' is not a string");
          f.metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const std::string what = "tensor '" + name + "'";
      if (!v.is_object()) throw_error(path, ": ", what, ": entry is not a JSON object");
      SafetensorsTensorInfo t;
      t.name = name;
      auto dt = v.find("dtype");
      auto sh = v.find("shape");
      auto of = v.find("data_offsets");
      if (dt == v.end() || !dt->is_string()) throw_error(path, ": ", what, ": missing or non-string 'dtype'");
      if (sh == v.end() || !sh->is_array()) throw_error(path, ": ", what, ": missing or non-array 'shape'");
      if (of == v.end() || !of->is_array() || of->size() != 2)
        throw_error(path, ": ", what, ": 'data_offsets' must be an array [begin, end]");
      t.dtype_name = dt->get<std::string>();
      const DTypeEntry* e = find_dtype(t.dtype_name);
      if (!e) throw_error(path, ": ", what, ": unknown dtype '", t.dtype_name, "'");
      t.dtype = e->dtype;
      t.element_size = e->size;
      if (sh->size() > 64) throw_error(path, ": ", what, ": ", sh->size(), " dimensions is implausible");
      uint64_t numel = 1;
      for (const auto& d : *sh) {
        uint64_t x = json_u64(d, path, what + " shape entry");
        if (x > uint64_t(INT64_MAX)) throw_error(path, ": ", what, ": dimension ", x, " too large");
        t.shape.push_back(int64_t(x));
        numel = io::checked_mul(numel, x, path, what.c_str());
      }
      const uint64_t nbytes = io::checked_mul(numel, uint64_t(e->size), path, what.c_str());
      t.begin = json_u64((*of)[0], path, what + " data_offsets[0]");
      t.end = json_u64((*of)[1], path, what + " data_offsets[1]");
      if (t.end < t.begin) throw_error(path, ": ", what, ": data_offsets [", t.begin, ", ", t.end, "] end before begin");
      if (t.end - t.begin != nbytes)
        throw_error(path, ": ", what, ": data_offsets [", t.begin, ", ", t.end, "] span ", t.end - t.begin, " bytes but ",
                    t.dtype_name, " ", shape_str(t.shape), " needs ", nbytes);
      if (t.end > data_size)
        throw_error(path, ": ", what, ": data_offsets end ", t.end, " is past the end of the data (", data_size,
                    " bytes after the header; file truncated?)");
      f.tensors_.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    throw_error(path, ": malformed safetensors header: ", e.what());
  }

  // Tensors must tile the buffer exactly: no overlap, no holes, nothing after the last one
  // (safetensors tensor.rs `validate`: InvalidOffset / MetadataIncompleteBuffer).
  std::vector<const SafetensorsTensorInfo*> by_offset;
  for (const auto& t : f.tensors_) by_offset.push_back(&t);
  std::stable_sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t at = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const auto* t : by_offset) {
    if (t->begin < at)
      throw_error(path, ": tensor '", t->name, "' [", t->begin, ", ", t->end, ") overlaps tensor '", prev->name, "' [", prev->begin,
                  ", ", prev->end, ")");
    if (t->begin > at)
      throw_error(path, ": ", t->begin - at, " unused bytes before tensor '", t->name, "' at data offset ", at,
                  " (the format requires tensors to be contiguous)");
    at = t->end;
    prev = t;
  }
  if (at != data_size)
    throw_error(path, ": ", data_size - at, " bytes after the last tensor (data is ", data_size, " bytes, tensors cover ", at, ")");
  for (size_t i = 0; i < f.tensors_.size(); ++i) f.index_[f.tensors_[i].name] = i;
  return f;
}

const SafetensorsTensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const SafetensorsTensorInfo& SafetensorsFile::get(const std::string& name) const {
  const auto* t = find(name);
  if (!t) throw_error(path_, ": no tensor named '", name, "'");
  return *t;
}

const uint8_t* SafetensorsFile::bytes_of(const SafetensorsTensorInfo& t) const {
  return file_->data() + data_start_ + t.begin;  // bounds validated in open()
}

Tensor SafetensorsFile::load(const std::string& name) const {
  const auto& t = get(name);
  if (!t.dtype) throw_error(path_, ": tensor '", name, "' has dtype ", t.dtype_name, ", which lowbit does not support");
  Tensor out = Tensor::empty(t.shape, *t.dtype);
  if (out.nbytes() > 0) std::memcpy(out.raw_data(), bytes_of(t), out.nbytes());
  return out;
}

Tensor SafetensorsFile::map(const std::string& name) const {
  const auto& t = get(name);
  if (!t.dtype) throw_error(path_, ": tensor '", name, "' has dtype ", t.dtype_name, ", which lowbit does not support");
  const uint8_t* p = bytes_of(t);
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(*t.dtype) != 0 || shape_numel(t.shape) == 0) return load(name);
  return Tensor::from_blob(const_cast<uint8_t*>(p), t.shape, *t.dtype, file_);
}

Tensor SafetensorsFile::load_f32(const std::string& name) const {
  const auto& t = get(name);
  if (!t.dtype) throw_error(path_, ": tensor '", name, "' has dtype ", t.dtype_name, ", which lowbit cannot convert to f32");
  return io::tensor_from_bytes_f32(bytes_of(t), *t.dtype, t.shape);
}

void SafetensorsFile::read_bytes(const std::string& name, uint64_t offset, uint64_t n, void* dst) const {
  const auto& t = get(name);
  if (offset > t.end - t.begin || n > t.end - t.begin - offset)
    throw_error(path_, ": tensor '", name, "': bytes [", offset, ", ", offset + n, ") are outside its ", t.end - t.begin);
  io::pread_exact(path_, data_start_ + t.begin + offset, n, dst, "tensor '" + name + "'");
}

void SafetensorsFile::read_f32(const std::string& name, int64_t first, int64_t count, float* dst) const {
  const auto& t = get(name);
  if (!t.dtype) throw_error(path_, ": tensor '", name, "' has dtype ", t.dtype_name, ", which lowbit cannot convert to f32");
  const int64_t numel = shape_numel(t.shape);
  if (first < 0 || count < 0 || first > numel || count > numel - first)
    throw_error(path_, ": tensor '", name, "': elements [", first, ", ", first + count, ") are outside its ", numel);
  const int64_t es = t.element_size;
  if (*t.dtype == DType::F32) {
    read_bytes(name, uint64_t(first * es), uint64_t(count * es), dst);
    return;
  }
  constexpr int64_t kChunk = 1 << 20;  // elements per read: a 2-4 MiB buffer
  std::vector<uint8_t> buf(size_t(std::min(count, kChunk) * es));
  for (int64_t at = 0; at < count; at += kChunk) {
    const int64_t n = std::min(kChunk, count - at);
    read_bytes(name, uint64_t((first + at) * es), uint64_t(n * es), buf.data());
    io::convert_to_f32(buf.data(), *t.dtype, n, dst + at);
  }
}

Tensor SafetensorsFile::read_f32(const std::string& name) const {
  const auto& t = get(name);
  Tensor out = Tensor::empty(t.shape, DType::F32);
  read_f32(name, 0, out.numel(), out.data<float>());
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsStreamEntry> entries;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw_error(path, ": tensor '", name, "' is undefined");
    Tensor c = t.to(Device::CPU).contiguous();
    entries.push_back({name, c.dtype(), c.shape(), [c](const std::function<void(const void*, size_t)>& out) {
                         out(c.raw_data(), c.nbytes());
                       }});
  }
  save_safetensors_streamed(path, entries, metadata);
}

void save_safetensors_streamed(const std::string& path, const std::vector<SafetensorsStreamEntry>& entries,
                               const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const auto& e : entries) {
    if (e.name == "__metadata__") throw_error(path, ": a tensor cannot be named __metadata__");
    if (header.contains(e.name)) throw_error(path, ": duplicate tensor name '", e.name, "'");
    const uint64_t nbytes = uint64_t(shape_numel(e.shape)) * uint64_t(dtype_size(e.dtype));
    header[e.name] = {{"dtype", safetensors_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    sizes.push_back(nbytes);
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    throw_error(path, ": cannot write safetensors header (tensor or metadata names must be valid UTF-8): ", e.what());
  }
  // The reference writer pads the header with spaces so the data starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  io::AtomicFileWriter out(path);
  out.write_pod(uint64_t(text.size()));
  out.write(text.data(), text.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    uint64_t got = 0;
    entries[i].write([&](const void* p, size_t n) {
      got += n;
      if (got > sizes[i]) throw_error(path, ": tensor '", entries[i].name, "' gave more than its ", sizes[i], " bytes");
      out.write(p, n);
    });
    if (got != sizes[i]) throw_error(path, ": tensor '", entries[i].name, "' gave ", got, " bytes, expected ", sizes[i]);
  }
  out.commit();
}

bool looks_like_safetensors(const std::string& path) {
  try {
    auto f = io::MappedFile::open(path);
    if (f->size() < 10) return false;
    uint64_t n;
    std::memcpy(&n, f->data(), 8);
    return n <= f->size() - 8 && n <= kMaxHeaderBytes && f->data()[8] == '{';
  } catch (const Error&) {
    return false;
  }
}

}  // namespace lowbit
