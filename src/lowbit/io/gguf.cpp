#include "lowbit/io/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>

#include "lowbit/io/file_util.h"
#include "lowbit/io/rope_layout.h"
#include "lowbit/io/weight_names.h"

namespace lowbit {

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr int kMaxDims = 4;          // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 16;   // nested arrays deeper than this are not real metadata
constexpr uint64_t kDefaultAlignment = 32;  // GGUF_DEFAULT_ALIGNMENT

// ggml_type ids and block layouts (ggml/include/ggml.h enum ggml_type, ggml/src/ggml.c
// type_traits). Ids 4, 5 and 31-33, 36-38 were removed from ggml and are never reused.
constexpr GgmlTypeTraits kGgmlTypes[] = {
    {0, "F32", 1, 4, DType::F32},
    {1, "F16", 1, 2, DType::F16},
    {2, "Q4_0", 32, 18, std::nullopt},
    {3, "Q4_1", 32, 20, std::nullopt},
    {6, "Q5_0", 32, 22, std::nullopt},
    {7, "Q5_1", 32, 24, std::nullopt},
    {8, "Q8_0", 32, 34, std::nullopt},
    {9, "Q8_1", 32, 36, std::nullopt},
    {10, "Q2_K", 256, 84, std::nullopt},
    {11, "Q3_K", 256, 110, std::nullopt},
    {12, "Q4_K", 256, 144, std::nullopt},
    {13, "Q5_K", 256, 176, std::nullopt},
    {14, "Q6_K", 256, 210, std::nullopt},
    {15, "Q8_K", 256, 292, std::nullopt},
    {16, "IQ2_XXS", 256, 66, std::nullopt},
    {17, "IQ2_XS", 256, 74, std::nullopt},
    {18, "IQ3_XXS", 256, 98, std::nullopt},
    {19, "IQ1_S", 256, 50, std::nullopt},
    {20, "IQ4_NL", 32, 18, std::nullopt},
    {21, "IQ3_S", 256, 110, std::nullopt},
    {22, "IQ2_S", 256, 82, std::nullopt},
    {23, "IQ4_XS", 256, 136, std::nullopt},
    {24, "I8", 1, 1, DType::I8},
    {25, "I16", 1, 2, DType::I16},
    {26, "I32", 1, 4, DType::I32},
    {27, "I64", 1, 8, DType::I64},
    {28, "F64", 1, 8, DType::F64},
    {29, "IQ1_M", 256, 56, std::nullopt},
    {30, "BF16", 1, 2, DType::BF16},
    {34, "TQ1_0", 256, 54, std::nullopt},
    {35, "TQ2_0", 256, 66, std::nullopt},
    {39, "MXFP4", 32, 17, std::nullopt},
};

// Bytes a value of type t occupies at least (used to reject counts the file cannot hold before
// allocating for them).
uint64_t min_value_bytes(GgufType t, uint32_t version) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    case GgufType::STRING: return version == 1 ? 4 : 8;
    case GgufType::ARRAY: return version == 1 ? 8 : 12;
  }
  return 1;
}

bool known_type(uint32_t t) { return t <= uint32_t(GgufType::F64); }

class Parser {
 public:
  Parser(io::ByteReader& r, uint32_t version) : r_(r), v1_(version == 1), version_(version) {}

  uint64_t count(const char* what) { return v1_ ? r_.read<uint32_t>(what) : r_.read<uint64_t>(what); }

  std::string string(const char* what, const std::string& context) {
    const size_t at = r_.pos();
    const uint64_t n = count(what);
    if (n > r_.remaining())
      throw_error(context, ": string length ", n, " at offset ", at, " exceeds the rest of the file (",
                  r_.remaining(), " bytes)");
    std::string s(r_.read_bytes(n, what));
    if (!io::valid_utf8(s)) throw_error(context, ": string at offset ", at, " is not valid UTF-8");
    return s;
  }

  GgufType type(const std::string& context) {
    const size_t at = r_.pos();
    const uint32_t t = r_.read<uint32_t>("value type");
    if (!known_type(t)) throw_error(context, ": unknown metadata value type ", t, " at offset ", at);
    return GgufType(t);
  }

  GgufValue value(GgufType t, const std::string& context, int depth) {
    GgufValue v;
    v.type = t;
    switch (t) {
      case GgufType::U8: v.u = r_.read<uint8_t>("u8"); break;
      case GgufType::I8: v.i = r_.read<int8_t>("i8"); break;
      case GgufType::U16: v.u = r_.read<uint16_t>("u16"); break;
      case GgufType::I16: v.i = r_.read<int16_t>("i16"); break;
      case GgufType::U32: v.u = r_.read<uint32_t>("u32"); break;
      case GgufType::I32: v.i = r_.read<int32_t>("i32"); break;
      case GgufType::U64: v.u = r_.read<uint64_t>("u64"); break;
      case GgufType::I64: v.i = r_.read<int64_t>("i64"); break;
      case GgufType::F32: v.f = r_.read<float>("f32"); break;
      case GgufType::F64: v.f = r_.read<double>("f64"); break;
      case GgufType::BOOL: v.u = r_.read<uint8_t>("bool") != 0; break;
      case GgufType::STRING: v.str = string("string value", context); break;
      case GgufType::ARRAY: {
        if (depth >= kMaxArrayDepth)
          throw_error(context, ": arrays nested deeper than ", kMaxArrayDepth, " levels");
        v.elem_type = type(context);
        const size_t at = r_.pos();
        const uint64_t n = count("array length");
        if (n > r_.remaining() / min_value_bytes(v.elem_type, version_))
          throw_error(context, ": array of ", n, " ", gguf_type_name(v.elem_type), " at offset ", at,
                      " cannot fit in the rest of the file (", r_.remaining(), " bytes)");
        v.array.reserve(size_t(n));
        for (uint64_t k = 0; k < n; ++k) {
          GgufType et = v.elem_type;
          v.array.push_back(value(et, context, depth + 1));
        }
        break;
      }
    }
    return v;
  }

 private:
  io::ByteReader& r_;
  bool v1_;
  uint32_t version_;
};

std::string kv_ctx(const std::string& path, const std::string& key) { return path + ": metadata key '" + key + "'"; }

}  // namespace

// ---- GgufValue -----------------------------------------------------------------------------------

const char* gguf_type_name(GgufType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  return known_type(uint32_t(t)) ? names[uint32_t(t)] : "unknown";
}

GgufValue GgufValue::u32(uint32_t x) {
  GgufValue v;
  v.type = GgufType::U32;
  v.u = x;
  return v;
}
GgufValue GgufValue::i32(int32_t x) {
  GgufValue v;
  v.type = GgufType::I32;
  v.i = x;
  return v;
}
GgufValue GgufValue::f32(float x) {
  GgufValue v;
  v.type = GgufType::F32;
  v.f = x;
  return v;
}
GgufValue GgufValue::boolean(bool x) {
  GgufValue v;
  v.type = GgufType::BOOL;
  v.u = x;
  return v;
}
GgufValue GgufValue::string(std::string x) {
  GgufValue v;
  v.type = GgufType::STRING;
  v.str = std::move(x);
  return v;
}
GgufValue GgufValue::string_array(const std::vector<std::string>& xs) {
  GgufValue v;
  v.type = GgufType::ARRAY;
  v.elem_type = GgufType::STRING;
  for (const auto& x : xs) v.array.push_back(string(x));
  return v;
}
GgufValue GgufValue::f32_array(const std::vector<float>& xs) {
  GgufValue v;
  v.type = GgufType::ARRAY;
  v.elem_type = GgufType::F32;
  for (float x : xs) v.array.push_back(f32(x));
  return v;
}
GgufValue GgufValue::i32_array(const std::vector<int32_t>& xs) {
  GgufValue v;
  v.type = GgufType::ARRAY;
  v.elem_type = GgufType::I32;
  for (int32_t x : xs) v.array.push_back(i32(x));
  return v;
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16: case GgufType::U32:
    case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
    default: return false;
  }
}

int64_t GgufValue::as_int(const std::string& what) const {
  if (!is_integer()) throw_error(what, ": expected an integer, found ", gguf_type_name(type));
  if (type == GgufType::I8 || type == GgufType::I16 || type == GgufType::I32 || type == GgufType::I64) return i;
  if (u > uint64_t(std::numeric_limits<int64_t>::max())) throw_error(what, ": value ", u, " is out of range");
  return int64_t(u);
}

double GgufValue::as_float(const std::string& what) const {
  if (is_float()) return f;
  if (is_integer()) return double(as_int(what));
  throw_error(what, ": expected a number, found ", gguf_type_name(type));
}

const std::string& GgufValue::as_string(const std::string& what) const {
  if (type != GgufType::STRING) throw_error(what, ": expected a string, found ", gguf_type_name(type));
  return str;
}

std::vector<std::string> GgufValue::as_string_array(const std::string& what) const {
  if (type != GgufType::ARRAY || elem_type != GgufType::STRING)
    throw_error(what, ": expected an array of strings, found ", gguf_type_name(type),
                type == GgufType::ARRAY ? std::string(" of ") + gguf_type_name(elem_type) : std::string());
  std::vector<std::string> out;
  out.reserve(array.size());
  for (const auto& v : array) out.push_back(v.str);
  return out;
}

std::vector<float> GgufValue::as_float_array(const std::string& what) const {
  if (type != GgufType::ARRAY) throw_error(what, ": expected an array, found ", gguf_type_name(type));
  std::vector<float> out;
  out.reserve(array.size());
  for (const auto& v : array) out.push_back(float(v.as_float(what)));
  return out;
}

std::vector<int32_t> GgufValue::as_int32_array(const std::string& what) const {
  if (type != GgufType::ARRAY) throw_error(what, ": expected an array, found ", gguf_type_name(type));
  std::vector<int32_t> out;
  out.reserve(array.size());
  for (const auto& v : array) {
    const int64_t x = v.as_int(what);
    if (x < INT32_MIN || x > INT32_MAX) throw_error(what, ": value ", x, " is out of int32 range");
    out.push_back(int32_t(x));
  }
  return out;
}

// ---- type table ------------------------------------------------------------------------------------

const GgmlTypeTraits* ggml_type_traits(uint32_t id) {
  for (const auto& t : kGgmlTypes)
    if (t.id == id) return &t;
  return nullptr;
}

const GgmlTypeTraits& ggml_type_for(DType d) {
  for (const auto& t : kGgmlTypes)
    if (t.dtype && *t.dtype == d) return t;
  throw_error("dtype ", dtype_name(d), " has no ggml type");
}

// ---- reader -----------------------------------------------------------------------------------------

GgufFile GgufFile::open(const std::string& path) {
  GgufFile g;
  g.path_ = path;
  g.file_ = io::MappedFile::open(path);
  io::ByteReader r(g.file_->data(), g.file_->size(), path);
  if (g.file_->size() < 8 || std::memcmp(g.file_->data(), kMagic, 4) != 0)
    throw_error(path, ": not a GGUF file (no 'GGUF' magic at offset 0)");
  r.seek(4);
  g.version_ = r.read<uint32_t>("version");
  if (g.version_ < 1 || g.version_ > 3) {
    const uint32_t swapped = __builtin_bswap32(g.version_);
    if (swapped >= 1 && swapped <= 3)
      throw_error(path, ": big-endian GGUF (version ", swapped, ") is not supported; use a little-endian file");
    throw_error(path, ": unsupported GGUF version ", g.version_, " (lowbit reads versions 1, 2 and 3)");
  }
  Parser p(r, g.version_);
  const uint64_t n_tensors = p.count("tensor count");
  const uint64_t n_kv = p.count("metadata count");
  // Each key/value needs at least a key length, a type and a 1-byte value; each tensor info at
  // least a name length, n_dims, a type and an offset. Reject counts the file cannot hold.
  const uint64_t min_kv = (g.version_ == 1 ? 4 : 8) + 4 + 1, min_ti = (g.version_ == 1 ? 4 : 8) + 4 + 4 + 8;
  if (n_kv > r.remaining() / min_kv)
    throw_error(path, ": header claims ", n_kv, " metadata entries, more than the file (", g.file_->size(), " bytes) can hold");
  if (n_tensors > r.remaining() / min_ti)
    throw_error(path, ": header claims ", n_tensors, " tensors, more than the file (", g.file_->size(), " bytes) can hold");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = p.string("metadata key", path + ": metadata entry " + std::to_string(k));
    if (key.empty()) throw_error(path, ": metadata entry ", k, " has an empty key");
    const std::string ctx = kv_ctx(path, key);
    GgufType t = p.type(ctx);
    GgufValue v = p.value(t, ctx, 0);
    if (g.kv_index_.count(key)) throw_error(ctx, ": duplicate key");
    g.kv_index_[key] = g.kv_.size();
    g.kv_.emplace_back(std::move(key), std::move(v));
  }
  if (const GgufValue* a = g.find("general.alignment")) {
    const int64_t al = a->as_int(kv_ctx(path, "general.alignment"));
    if (al <= 0 || (al & (al - 1)) != 0 || al > (1 << 20))
      throw_error(kv_ctx(path, "general.alignment"), ": alignment ", al, " must be a power of two up to 1 MiB");
    g.alignment_ = uint64_t(al);
  }

  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo t;
    t.name = p.string("tensor name", path + ": tensor info " + std::to_string(k));
    const std::string ctx = path + ": tensor '" + t.name + "'";
    if (g.tensor_index_.count(t.name)) throw_error(ctx, ": duplicate tensor name");
    const uint32_t n_dims = r.read<uint32_t>("n_dims");
    if (n_dims > kMaxDims) throw_error(ctx, ": ", n_dims, " dimensions (GGUF allows at most ", kMaxDims, ")");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t x = g.version_ == 1 ? r.read<uint32_t>("dimension") : r.read<uint64_t>("dimension");
      if (x > uint64_t(std::numeric_limits<int64_t>::max())) throw_error(ctx, ": dimension ", d, " = ", x, " is too large");
      t.ne.push_back(int64_t(x));
      numel = io::checked_mul(numel, x, ctx, "the tensor");
    }
    t.ggml_type = r.read<uint32_t>("ggml type");
    const GgmlTypeTraits* tt = ggml_type_traits(t.ggml_type);
    if (!tt) throw_error(ctx, ": unknown ggml type id ", t.ggml_type);
    const uint64_t row = t.ne.empty() ? 1 : uint64_t(t.ne[0]);
    if (row % uint64_t(tt->block_size) != 0)
      throw_error(ctx, ": row length ", row, " is not a multiple of the ", tt->name, " block size ", tt->block_size);
    t.nbytes = io::checked_mul(numel / uint64_t(tt->block_size), uint64_t(tt->type_size), ctx, "the tensor");
    t.offset = r.read<uint64_t>("tensor offset");
    if (t.offset % g.alignment_ != 0)
      throw_error(ctx, ": offset ", t.offset, " is not a multiple of the alignment ", g.alignment_);
    g.tensor_index_[t.name] = g.tensors_.size();
    g.tensors_.push_back(std::move(t));
  }
  // The data section starts at the next multiple of the alignment after the tensor infos.
  const uint64_t pos = r.pos();
  g.data_offset_ = io::checked_add(pos, (g.alignment_ - pos % g.alignment_) % g.alignment_, path, "the header");
  const uint64_t size = g.file_->size();
  if (!g.tensors_.empty() && g.data_offset_ > size)
    throw_error(path, ": tensor data would start at offset ", g.data_offset_, ", past the end of the file (", size, " bytes)");
  const uint64_t data_size = g.data_offset_ <= size ? size - g.data_offset_ : 0;
  std::vector<const GgufTensorInfo*> order;
  for (const auto& t : g.tensors_) {
    if (t.offset > data_size || t.nbytes > data_size - t.offset)
      throw_error(path, ": tensor '", t.name, "' data [", t.offset, ", +", t.nbytes, ") extends past the end of the file (",
                  data_size, " bytes of tensor data; file truncated?)");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k)
    if (order[k]->offset < order[k - 1]->offset + order[k - 1]->nbytes)
      throw_error(path, ": tensor '", order[k]->name, "' at data offset ", order[k]->offset, " overlaps tensor '",
                  order[k - 1]->name, "' [", order[k - 1]->offset, ", ", order[k - 1]->offset + order[k - 1]->nbytes, ")");
  return g;
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::tensor_bytes(const GgufTensorInfo& t) const {
  return file_->data() + data_offset_ + t.offset;  // bounds validated in open()
}

Tensor GgufFile::load_f32(const std::string& name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) throw_error(path_, ": no tensor named '", name, "'");
  const GgmlTypeTraits* tt = ggml_type_traits(t->ggml_type);
  if (!tt->dtype)
    throw_error(path_, ": tensor '", name, "' has ggml type ", tt->name,
                ", which lowbit cannot load yet (supported: F32, F16, BF16, F64 and integer types)");
  return io::tensor_from_bytes_f32(tensor_bytes(*t), *tt->dtype, t->shape());
}

// ---- writer ----------------------------------------------------------------------------------------

namespace {

class Writer {
 public:
  explicit Writer(io::AtomicFileWriter& out) : out_(out) {}
  void string(const std::string& s) {
    out_.write_pod(uint64_t(s.size()));
    out_.write(s.data(), s.size());
  }
  void value(const GgufValue& v) {
    switch (v.type) {
      case GgufType::U8: out_.write_pod(uint8_t(v.u)); break;
      case GgufType::I8: out_.write_pod(int8_t(v.i)); break;
      case GgufType::U16: out_.write_pod(uint16_t(v.u)); break;
      case GgufType::I16: out_.write_pod(int16_t(v.i)); break;
      case GgufType::U32: out_.write_pod(uint32_t(v.u)); break;
      case GgufType::I32: out_.write_pod(int32_t(v.i)); break;
      case GgufType::U64: out_.write_pod(uint64_t(v.u)); break;
      case GgufType::I64: out_.write_pod(int64_t(v.i)); break;
      case GgufType::F32: out_.write_pod(float(v.f)); break;
      case GgufType::F64: out_.write_pod(double(v.f)); break;
      case GgufType::BOOL: out_.write_pod(uint8_t(v.u ? 1 : 0)); break;
      case GgufType::STRING: string(v.str); break;
      case GgufType::ARRAY:
        out_.write_pod(uint32_t(v.elem_type));
        out_.write_pod(uint64_t(v.array.size()));
        for (const auto& e : v.array) {
          if (e.type != v.elem_type)
            throw_error(out_.path(), ": GGUF array of ", gguf_type_name(v.elem_type), " holds a ", gguf_type_name(e.type));
          value(e);
        }
        break;
    }
  }

 private:
  io::AtomicFileWriter& out_;
};

void check_utf8(const std::string& path, const std::string& s, const char* what) {
  if (!io::valid_utf8(s)) throw_error(path, ": ", what, " is not valid UTF-8");
}

void check_strings(const std::string& path, const GgufValue& v, const std::string& key) {
  if (v.type == GgufType::STRING && !io::valid_utf8(v.str))
    throw_error(path, ": metadata key '", key, "': string value is not valid UTF-8");
  for (const auto& e : v.array) check_strings(path, e, key);
}

}  // namespace

void write_gguf(const std::string& path, const GgufMetadata& metadata, const std::vector<std::pair<std::string, Tensor>>& tensors,
                uint32_t alignment) {
  LB_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, path, ": GGUF alignment ", alignment, " is not a power of two");
  GgufMetadata kv = metadata;
  std::set<std::string> keys;
  for (const auto& [k, v] : kv) {
    check_utf8(path, k, "metadata key");
    check_strings(path, v, k);
    if (!keys.insert(k).second) throw_error(path, ": duplicate metadata key '", k, "'");
  }
  if (alignment != kDefaultAlignment && !keys.count("general.alignment"))
    kv.emplace_back("general.alignment", GgufValue::u32(alignment));
  std::vector<Tensor> data;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    check_utf8(path, name, "tensor name");
    if (!names.insert(name).second) throw_error(path, ": duplicate tensor name '", name, "'");
    if (!t.defined()) throw_error(path, ": tensor '", name, "' is undefined");
    if (t.dim() > kMaxDims) throw_error(path, ": tensor '", name, "' has ", t.dim(), " dimensions (GGUF allows ", kMaxDims, ")");
    ggml_type_for(t.dtype());  // throws for dtypes without a ggml type
    data.push_back(t.to(Device::CPU).contiguous());
  }

  io::AtomicFileWriter out(path);
  Writer w(out);
  out.write(kMagic, 4);
  out.write_pod(uint32_t(3));
  out.write_pod(uint64_t(tensors.size()));
  out.write_pod(uint64_t(kv.size()));
  for (const auto& [k, v] : kv) {
    w.string(k);
    out.write_pod(uint32_t(v.type));
    w.value(v);
  }
  auto padded = [&](uint64_t n) { return (n + alignment - 1) / alignment * alignment; };
  uint64_t offset = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = data[k];
    w.string(tensors[k].first);
    out.write_pod(uint32_t(t.dim()));
    for (int64_t d = t.dim() - 1; d >= 0; --d) out.write_pod(uint64_t(t.size(d)));  // ne[0] innermost
    out.write_pod(ggml_type_for(t.dtype()).id);
    out.write_pod(offset);
    offset += padded(t.nbytes());
  }
  out.write_zeros(size_t(padded(out.bytes_written()) - out.bytes_written()));
  for (const auto& t : data) {
    out.write(t.raw_data(), t.nbytes());
    out.write_zeros(size_t(padded(t.nbytes()) - t.nbytes()));
  }
  out.commit();
}

bool looks_like_gguf(const std::string& path) {
  try {
    auto f = io::MappedFile::open(path);
    return f->size() >= 4 && std::memcmp(f->data(), kMagic, 4) == 0;
  } catch (const Error&) {
    return false;
  }
}

// ---- Llama-family models -----------------------------------------------------------------------

namespace {

struct ArchKeys {
  const GgufFile& f;
  std::string prefix;  // "llama."
  const GgufValue* get(const std::string& k) const { return f.find(prefix + k); }
  std::string ctx(const std::string& k) const { return kv_ctx(f.path(), prefix + k); }
  int integer(const std::string& k, std::optional<int> def = std::nullopt) const {
    const GgufValue* v = get(k);
    if (!v) {
      if (!def) throw_error(f.path(), ": missing required metadata key '", prefix + k, "'");
      return *def;
    }
    if (v->type == GgufType::ARRAY)
      throw_error(ctx(k), ": per-layer values (an array) are not supported");
    const int64_t x = v->as_int(ctx(k));
    if (x < INT32_MIN || x > INT32_MAX) throw_error(ctx(k), ": value ", x, " is out of range");
    return int(x);
  }
  float number(const std::string& k, float def) const {
    const GgufValue* v = get(k);
    return v ? float(v->as_float(ctx(k))) : def;
  }
};

int optional_id(const GgufFile& f, const char* key) {
  const GgufValue* v = f.find(key);
  if (!v) return -1;
  const int64_t x = v->as_int(kv_ctx(f.path(), key));
  return (x < 0 || x > INT32_MAX) ? -1 : int(x);
}

}  // namespace

LlamaConfig gguf_llama_config(const GgufFile& f) {
  const GgufValue* archv = f.find("general.architecture");
  if (!archv) throw_error(f.path(), ": missing metadata key 'general.architecture'");
  const std::string arch = archv->as_string(kv_ctx(f.path(), "general.architecture"));
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3")
    throw_error(f.path(), ": unsupported GGUF architecture '", arch, "' (lowbit reads llama, qwen2 and qwen3)");
  ArchKeys k{f, arch + "."};
  LlamaConfig c;
  c.arch = arch;
  c.dim = k.integer("embedding_length");
  c.hidden_dim = k.integer("feed_forward_length");
  c.n_layers = k.integer("block_count");
  c.n_heads = k.integer("attention.head_count");
  c.n_kv_heads = k.integer("attention.head_count_kv", c.n_heads);
  c.max_seq_len = k.integer("context_length", 2048);
  c.rope_theta = k.number("rope.freq_base", 10000.0f);
  c.norm_eps = k.number("attention.layer_norm_rms_epsilon", 1e-5f);
  c.head_dim = k.integer("attention.key_length", 0);
  if (c.head_dim != 0 && k.integer("attention.value_length", c.head_dim) != c.head_dim)
    throw_error(f.path(), ": attention.key_length and value_length differ; not supported");
  if (c.n_heads > 0 && c.head_dim * c.n_heads == c.dim) c.head_dim = 0;
  if (k.get("rope.dimension_count")) {
    const int rot = k.integer("rope.dimension_count");
    const int hd = c.head_dim ? c.head_dim : (c.n_heads > 0 ? c.dim / c.n_heads : 0);
    if (rot != hd)
      throw_error(k.ctx("rope.dimension_count"), ": partial rotary embeddings (", rot, " of ", hd,
                  " channels per head) are not supported");
  }
  if (const GgufValue* rs = k.get("rope.scaling.type")) {
    const std::string t = rs->as_string(k.ctx("rope.scaling.type"));
    if (t != "none")
      throw_error(k.ctx("rope.scaling.type"), ": RoPE scaling '", t, "' is not supported yet (no frequency scaling in lowbit's RoPE)");
  }
  if (f.find_tensor("rope_freqs.weight"))
    throw_error(f.path(), ": tensor 'rope_freqs.weight' (Llama 3.1 RoPE frequency scaling) is not supported yet");
  const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
  if (!emb) throw_error(f.path(), ": missing tensor 'token_embd.weight'");
  if (emb->ne.size() != 2) throw_error(f.path(), ": tensor 'token_embd.weight' has ", emb->ne.size(), " dimensions, expected 2");
  if (emb->ne[1] > INT32_MAX) throw_error(f.path(), ": vocabulary of ", emb->ne[1], " tokens is too large");
  c.vocab_size = int(emb->ne[1]);
  if (k.get("vocab_size") && k.integer("vocab_size") != c.vocab_size)
    throw_error(k.ctx("vocab_size"), ": ", k.integer("vocab_size"), " does not match token_embd.weight (", c.vocab_size, " rows)");
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attn_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.qk_norm = f.find_tensor("blk.0.attn_q_norm.weight") != nullptr;
  // llama.cpp's converter permutes HF q/k rows back to Meta's layout for "llama" (LLAMA_ROPE_TYPE_NORM);
  // qwen2/qwen3 keep the HF layout and use NEOX-style RoPE.
  c.rope_style = arch == "llama" ? RopeStyle::Interleaved : RopeStyle::Half;
  c.bos_id = optional_id(f, "tokenizer.ggml.bos_token_id");
  c.eos_id = optional_id(f, "tokenizer.ggml.eos_token_id");
  c.validate(f.path());
  return c;
}

TokenizerVocab gguf_tokenizer_vocab(const GgufFile& f) {
  TokenizerVocab v;
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  const GgufValue* model = f.find("tokenizer.ggml.model");
  if (!tokens || !model) return v;
  auto ctx = [&](const char* key) { return kv_ctx(f.path(), key); };
  v.model = model->as_string(ctx("tokenizer.ggml.model"));
  if (const GgufValue* p = f.find("tokenizer.ggml.pre")) v.pre = p->as_string(ctx("tokenizer.ggml.pre"));
  v.tokens = tokens->as_string_array(ctx("tokenizer.ggml.tokens"));
  if (const GgufValue* s = f.find("tokenizer.ggml.scores")) v.scores = s->as_float_array(ctx("tokenizer.ggml.scores"));
  if (const GgufValue* t = f.find("tokenizer.ggml.token_type")) v.token_types = t->as_int32_array(ctx("tokenizer.ggml.token_type"));
  if (const GgufValue* m = f.find("tokenizer.ggml.merges")) v.merges = m->as_string_array(ctx("tokenizer.ggml.merges"));
  if (!v.scores.empty() && v.scores.size() != v.tokens.size())
    throw_error(ctx("tokenizer.ggml.scores"), ": ", v.scores.size(), " scores for ", v.tokens.size(), " tokens");
  if (!v.token_types.empty() && v.token_types.size() != v.tokens.size())
    throw_error(ctx("tokenizer.ggml.token_type"), ": ", v.token_types.size(), " types for ", v.tokens.size(), " tokens");
  v.bos_id = optional_id(f, "tokenizer.ggml.bos_token_id");
  v.eos_id = optional_id(f, "tokenizer.ggml.eos_token_id");
  v.unk_id = optional_id(f, "tokenizer.ggml.unknown_token_id");
  v.pad_id = optional_id(f, "tokenizer.ggml.padding_token_id");
  for (auto [key, out] : {std::pair{"tokenizer.ggml.add_bos_token", &v.add_bos}, {"tokenizer.ggml.add_eos_token", &v.add_eos}})
    if (const GgufValue* b = f.find(key)) *out = (b->type == GgufType::BOOL ? b->u : uint64_t(b->as_int(ctx(key)))) != 0;
  if (const GgufValue* t = f.find("tokenizer.chat_template")) v.chat_template = t->as_string(ctx("tokenizer.chat_template"));
  return v;
}

Checkpoint load_gguf(const std::string& path) {
  GgufFile f = GgufFile::open(path);
  Checkpoint ck;
  ck.source = path;
  ck.config = gguf_llama_config(f);
  ck.vocab = gguf_tokenizer_vocab(f);
  std::set<std::string> used;
  // Old converters (e.g. the version-1 stories260K file) store output.weight even when it is
  // the embedding. When the two are bit-identical the model is exactly a tied one: load it as
  // such (half the memory; saves back without the copy).
  if (const GgufTensorInfo* out = f.find_tensor("output.weight")) {
    const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
    if (out->ne == emb->ne && out->ggml_type == emb->ggml_type &&
        std::memcmp(f.tensor_bytes(*out), f.tensor_bytes(*emb), size_t(out->nbytes)) == 0) {
      ck.config.tied_embeddings = true;
      used.insert("output.weight");
    }
  }
  for (auto& slot : io::weight_slots(ck.config, ck.weights)) {
    const GgufTensorInfo* t = f.find_tensor(slot.gguf_name);
    if (!t) throw_error(path, ": missing tensor '", slot.gguf_name, "' (", ck.config.summary(), ")");
    if (t->shape() != slot.shape)
      throw_error(path, ": tensor '", slot.gguf_name, "' has ne ", shape_str(t->ne), " (shape ", shape_str(t->shape()),
                  "), the config needs shape ", shape_str(slot.shape));
    *slot.tensor = f.load_f32(slot.gguf_name);
    used.insert(slot.gguf_name);
  }
  size_t unused = 0;
  std::string example;
  for (const auto& t : f.tensors())
    if (!used.count(t.name) && unused++ == 0) example = t.name;
  if (unused)
    std::fprintf(stderr, "lowbit: warning: %s: %zu tensors not used by the model are ignored (e.g. '%s')\n", path.c_str(), unused,
                 example.c_str());
  validate_weights(ck.config, ck.weights, path);
  return ck;
}

void save_gguf(const std::string& path, const LlamaConfig& config, const LlamaWeights& weights, const GgufSaveOptions& opt) {
  config.validate(path);
  validate_weights(config, weights, path);
  if (opt.dtype != DType::F32 && opt.dtype != DType::F16 && opt.dtype != DType::BF16)
    throw_error(path, ": GGUF tensors are saved as f32, f16 or bf16, not ", dtype_name(opt.dtype));
  // Mistral is "llama" in llama.cpp (same graph, same converter path).
  std::string arch = config.arch == "mistral" ? "llama" : config.arch;
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3") throw_error(path, ": cannot write architecture '", config.arch, "' to GGUF");
  if (arch == "llama" && (config.attn_bias || config.qk_norm))
    throw_error(path, ": a llama model with q/k/v biases or q/k norms has no GGUF llama equivalent");
  const RopeStyle style = arch == "llama" ? RopeStyle::Interleaved : RopeStyle::Half;
  LlamaWeights w = weights_with_rope_style(config, weights, style);

  const std::string a = arch + ".";
  GgufMetadata kv;
  kv.emplace_back("general.architecture", GgufValue::string(arch));
  if (!opt.name.empty()) kv.emplace_back("general.name", GgufValue::string(opt.name));
  // general.file_type: LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_BF16 = 32.
  kv.emplace_back("general.file_type", GgufValue::u32(opt.dtype == DType::F32 ? 0 : opt.dtype == DType::F16 ? 1 : 32));
  kv.emplace_back(a + "context_length", GgufValue::u32(uint32_t(config.max_seq_len)));
  kv.emplace_back(a + "embedding_length", GgufValue::u32(uint32_t(config.dim)));
  kv.emplace_back(a + "block_count", GgufValue::u32(uint32_t(config.n_layers)));
  kv.emplace_back(a + "feed_forward_length", GgufValue::u32(uint32_t(config.hidden_dim)));
  kv.emplace_back(a + "attention.head_count", GgufValue::u32(uint32_t(config.n_heads)));
  kv.emplace_back(a + "attention.head_count_kv", GgufValue::u32(uint32_t(config.n_kv_heads)));
  kv.emplace_back(a + "rope.dimension_count", GgufValue::u32(uint32_t(config.resolved_head_dim())));
  if (config.head_dim != 0 && config.head_dim * config.n_heads != config.dim) {
    kv.emplace_back(a + "attention.key_length", GgufValue::u32(uint32_t(config.head_dim)));
    kv.emplace_back(a + "attention.value_length", GgufValue::u32(uint32_t(config.head_dim)));
  }
  kv.emplace_back(a + "rope.freq_base", GgufValue::f32(config.rope_theta));
  kv.emplace_back(a + "attention.layer_norm_rms_epsilon", GgufValue::f32(config.norm_eps));
  kv.emplace_back(a + "vocab_size", GgufValue::u32(uint32_t(config.vocab_size)));
  if (opt.vocab && !opt.vocab->empty()) {
    const TokenizerVocab& v = *opt.vocab;
    if (int(v.tokens.size()) != config.vocab_size)
      throw_error(path, ": tokenizer has ", v.tokens.size(), " tokens but the model's vocabulary is ", config.vocab_size);
    kv.emplace_back("tokenizer.ggml.model", GgufValue::string(v.model));
    if (!v.pre.empty()) kv.emplace_back("tokenizer.ggml.pre", GgufValue::string(v.pre));
    kv.emplace_back("tokenizer.ggml.tokens", GgufValue::string_array(v.tokens));
    if (!v.scores.empty()) kv.emplace_back("tokenizer.ggml.scores", GgufValue::f32_array(v.scores));
    if (!v.token_types.empty()) kv.emplace_back("tokenizer.ggml.token_type", GgufValue::i32_array(v.token_types));
    if (!v.merges.empty()) kv.emplace_back("tokenizer.ggml.merges", GgufValue::string_array(v.merges));
    if (v.bos_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(v.bos_id)));
    if (v.eos_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(v.eos_id)));
    if (v.unk_id >= 0) kv.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::u32(uint32_t(v.unk_id)));
    if (v.pad_id >= 0) kv.emplace_back("tokenizer.ggml.padding_token_id", GgufValue::u32(uint32_t(v.pad_id)));
    if (v.add_bos >= 0) kv.emplace_back("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos != 0));
    if (v.add_eos >= 0) kv.emplace_back("tokenizer.ggml.add_eos_token", GgufValue::boolean(v.add_eos != 0));
    if (!v.chat_template.empty()) kv.emplace_back("tokenizer.chat_template", GgufValue::string(v.chat_template));
  } else {
    // llama.cpp requires tokenizer.ggml.model; "none" loads the model without a vocabulary.
    kv.emplace_back("tokenizer.ggml.model", GgufValue::string("none"));
    if (config.bos_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(config.bos_id)));
    if (config.eos_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(config.eos_id)));
  }

  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& slot : io::weight_slots(config, w)) {
    Tensor t = slot.tensor->to(Device::CPU).to(DType::F32).contiguous();
    // As llama.cpp's converter: 1-D tensors (norms, biases) stay f32.
    if (t.dim() >= 2 && opt.dtype != DType::F32) {
      if (opt.dtype == DType::F16) {
        const float* p = t.data<float>();
        for (int64_t k = 0; k < t.numel(); ++k)
          if (std::fabs(p[k]) > 65504.0f)
            throw_error(path, ": tensor '", slot.gguf_name, "' value ", p[k], " overflows f16; save as bf16 or f32");
      }
      t = t.to(opt.dtype);
    }
    tensors.emplace_back(slot.gguf_name, std::move(t));
  }
  write_gguf(path, kv, tensors);
}

}  // namespace lowbit
