#include "lowbit/io/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>

#include "lowbit/io/file_util.h"

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
  if (tt->dtype) return io::tensor_from_bytes_f32(tensor_bytes(*t), *tt->dtype, t->shape());
  const QuantFormat* qf = quant_format_for_ggml_type(t->ggml_type);
  if (!qf)
    throw_error(path_, ": tensor '", name, "' has ggml type ", tt->name, ", which lowbit cannot load yet (supported: ",
                "F32, F16, BF16, F64, integer types and ", ggml_block_type_names(), ")");
  // Exact dequantization, row by row (ne[0] is the row; open() checked it is whole blocks).
  const int64_t in = t->ne.empty() ? 1 : t->ne[0], rows = in > 0 ? t->numel() / in : 0;
  Tensor out = Tensor::empty(t->shape());
  const uint8_t* src = tensor_bytes(*t);
  float* dst = out.data<float>();
  const int64_t rb = qf->row_bytes(in);
#pragma omp parallel for schedule(static) if (rows * in >= (int64_t(1) << 16))
  for (int64_t r = 0; r < rows; ++r) qf->dequantize_row(src + r * rb, in, dst + r * in);
  return out;
}

QuantizedTensor GgufFile::load_quantized(const std::string& name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) throw_error(path_, ": no tensor named '", name, "'");
  const QuantFormat* qf = quant_format_for_ggml_type(t->ggml_type);
  const std::string ctx = path_ + ": tensor '" + name + "'";
  if (!qf) throw_error(ctx, ": ggml type ", ggml_type_traits(t->ggml_type)->name, " is not a ggml block format lowbit keeps packed (",
                       ggml_block_type_names(), ")");
  if (t->ne.size() != 2) throw_error(ctx, ": a packed weight must have 2 dimensions, got ", t->ne.size());
  const int64_t in = t->ne[0], out = t->ne[1];
  // Zero copy: the blocks stay in the mapped file (the tensor keeps the mapping alive). Sizes are
  // checked by make_ggml_quantized_tensor against the table entry validated at open().
  Tensor blocks = Tensor::from_blob(const_cast<uint8_t*>(tensor_bytes(*t)), {out, int64_t(t->nbytes) / (out > 0 ? out : 1)},
                                    DType::U8, file_);
  return make_ggml_quantized_tensor(*qf, out, in, blocks, ctx);
}

std::string ggml_block_type_names() {
  std::string s;
  for (const QuantFormat& f : all_quant_formats())
    if (f.is_ggml_block()) s += (s.empty() ? "" : ", ") + std::string(ggml_type_traits(uint32_t(f.ggml_type))->name);
  return s;
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
                uint32_t alignment, const std::vector<std::pair<std::string, QuantizedTensor>>& quantized) {
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
  // Every tensor as (name, PyTorch shape, ggml type, bytes).
  struct Item {
    std::string name;
    Shape shape;
    uint32_t type;
    Tensor bytes;
  };
  std::vector<Item> items;
  std::set<std::string> names;
  for (const auto& [name, q] : quantized) {
    check_utf8(path, name, "tensor name");
    if (!names.insert(name).second) throw_error(path, ": duplicate tensor name '", name, "'");
    const QuantFormat& f = q.fmt();
    if (!f.is_ggml_block())
      throw_error(path, ": tensor '", name, "' is in lowbit format ", f.name, ", which GGUF has no type for");
    q.validate();
    items.push_back({name, q.shape, uint32_t(f.ggml_type), q.codes});
  }
  for (const auto& [name, t] : tensors) {
    check_utf8(path, name, "tensor name");
    if (!names.insert(name).second) throw_error(path, ": duplicate tensor name '", name, "'");
    if (!t.defined()) throw_error(path, ": tensor '", name, "' is undefined");
    if (t.dim() > kMaxDims) throw_error(path, ": tensor '", name, "' has ", t.dim(), " dimensions (GGUF allows ", kMaxDims, ")");
    items.push_back({name, t.shape(), ggml_type_for(t.dtype()).id, t.to(Device::CPU).contiguous()});
  }

  io::AtomicFileWriter out(path);
  Writer w(out);
  out.write(kMagic, 4);
  out.write_pod(uint32_t(3));
  out.write_pod(uint64_t(items.size()));
  out.write_pod(uint64_t(kv.size()));
  for (const auto& [k, v] : kv) {
    w.string(k);
    out.write_pod(uint32_t(v.type));
    w.value(v);
  }
  auto padded = [&](uint64_t n) { return (n + alignment - 1) / alignment * alignment; };
  uint64_t offset = 0;
  for (const Item& it : items) {
    w.string(it.name);
    out.write_pod(uint32_t(it.shape.size()));
    for (auto d = it.shape.rbegin(); d != it.shape.rend(); ++d) out.write_pod(uint64_t(*d));  // ne[0] innermost
    out.write_pod(it.type);
    out.write_pod(offset);
    offset += padded(it.bytes.nbytes());
  }
  out.write_zeros(size_t(padded(out.bytes_written()) - out.bytes_written()));
  for (const Item& it : items) {
    out.write(it.bytes.raw_data(), it.bytes.nbytes());
    out.write_zeros(size_t(padded(it.bytes.nbytes()) - it.bytes.nbytes()));
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

}  // namespace lowbit
