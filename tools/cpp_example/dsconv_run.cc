// dsconv_run: run a model compiled by `dsconv-tvm compile` (a Relax VM .so) from C++, with only
// the TVM runtime (tvm-ffi headers + libtvm_runtime.so + libtvm_ffi.so): no Python, no compiler.
//
//   dsconv_run MODEL.so INPUT [--shape N,C,H,W] [--top-k K] [--repeat N] [--output FILE]
//                             [--threads T]
//
// INPUT is a .npy file (little-endian float32 '<f4', C order) or raw float32 (then --shape gives
// its shape; without --shape the compiled per-sample shape is assumed).  The samples are run
// through `main` in chunks of the compiled batch; the top-k classes of every sample and the
// latency of one `main` call (median of --repeat runs) are printed.  --output writes all outputs
// as .npy (if FILE ends with .npy) or raw float32.
//
// Exit status: 0 ok, 2 bad arguments or input file (one "dsconv_run: error: ..." line), 1 the
// model failed to run.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// A problem with the arguments or the input files: exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The model failed to load or run: exit status 1.
struct RunError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Shape = std::vector<int64_t>;

std::string ShapeStr(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t NumElements(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  if (s.size() < suffix.size()) return false;
  return std::equal(suffix.rbegin(), suffix.rend(), s.rbegin(),
                    [](char a, char b) { return std::tolower(a) == std::tolower(b); });
}

bool LittleEndianHost() {
  const uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw UsageError(path + ": read error");
  return data;
}

// ---- .npy ------------------------------------------------------------------------------------
// Format: "\x93NUMPY" major minor, header length (uint16 LE for v1, uint32 LE for v2/v3), then a
// Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } and the data.
struct Array {
  Shape shape;
  std::vector<float> data;
};

std::string DictValue(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) k = header.find("\"" + key + "\"");
  if (k == std::string::npos) throw UsageError(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k + key.size() + 2);
  if (colon == std::string::npos) throw UsageError(path + ": malformed .npy header");
  size_t v = header.find_first_not_of(" \t", colon + 1);
  if (v == std::string::npos) throw UsageError(path + ": malformed .npy header");
  size_t end;
  if (header[v] == '\'' || header[v] == '"') {
    end = header.find(header[v], v + 1);
    if (end == std::string::npos) throw UsageError(path + ": malformed .npy header");
    return header.substr(v + 1, end - v - 1);
  }
  if (header[v] == '(') {
    end = header.find(')', v);
    if (end == std::string::npos) throw UsageError(path + ": malformed .npy header");
    return header.substr(v, end - v + 1);
  }
  end = header.find_first_of(",}", v);
  std::string out = header.substr(v, end == std::string::npos ? std::string::npos : end - v);
  while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
  return out;
}

Shape ParseTuple(const std::string& tuple, const std::string& path) {
  Shape shape;
  std::string inner = tuple.substr(1, tuple.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" \tL");
    if (a == std::string::npos) continue;  // "(4,)" -> trailing empty item
    size_t b = item.find_last_not_of(" \tL");
    std::string num = item.substr(a, b - a + 1);
    char* endp = nullptr;
    long long d = std::strtoll(num.c_str(), &endp, 10);
    if (endp == num.c_str() || *endp != '\0' || d < 0)
      throw UsageError(path + ": bad dimension '" + num + "' in .npy shape " + tuple);
    shape.push_back(d);
  }
  return shape;
}

Array ParseNpy(const std::vector<char>& buf, const std::string& path) {
  if (buf.size() < 10 || std::memcmp(buf.data(), "\x93NUMPY", 6) != 0)
    throw UsageError(path + ": not a .npy file (no \\x93NUMPY magic)");
  const unsigned char major = static_cast<unsigned char>(buf[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(buf[8]) | (static_cast<unsigned char>(buf[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (buf.size() < 12) throw UsageError(path + ": truncated .npy header");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(buf[8 + i]);
    offset = 12;
  } else {
    throw UsageError(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (buf.size() < offset + header_len) throw UsageError(path + ": truncated .npy header");
  const std::string header(buf.data() + offset, header_len);
  const std::string descr = DictValue(header, "descr", path);
  if (descr != "<f4" && !(descr == "=f4" && LittleEndianHost()))
    throw UsageError(path + ": dtype '" + descr +
                     "' is not supported; save the array as little-endian float32 "
                     "(np.save(path, x.astype('<f4')))");
  if (DictValue(header, "fortran_order", path) != "False")
    throw UsageError(path + ": Fortran-order arrays are not supported; save np.ascontiguousarray(x)");
  const std::string tuple = DictValue(header, "shape", path);
  if (tuple.empty() || tuple.front() != '(') throw UsageError(path + ": malformed .npy shape");
  Array arr;
  arr.shape = ParseTuple(tuple, path);
  const size_t data_off = offset + header_len;
  const uint64_t want = static_cast<uint64_t>(NumElements(arr.shape)) * 4;
  const uint64_t have = buf.size() - data_off;
  if (have != want)
    throw UsageError(path + ": " + (have < want ? "truncated" : "has trailing bytes") + ": shape " +
                     ShapeStr(arr.shape) + " needs " + std::to_string(want) + " data bytes, found " +
                     std::to_string(have));
  arr.data.resize(static_cast<size_t>(NumElements(arr.shape)));
  if (want) std::memcpy(arr.data.data(), buf.data() + data_off, want);
  return arr;
}

void WriteFileAtomic(const std::string& path, const std::string& head, const float* data,
                     size_t count) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw UsageError("cannot write " + path + ": " + std::strerror(errno));
  bool ok = std::fwrite(head.data(), 1, head.size(), f) == head.size();
  if (count) ok = ok && std::fwrite(data, sizeof(float), count, f) == count;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw UsageError("cannot write " + path + ": " + why);
  }
}

void WriteOutput(const std::string& path, const Shape& shape, const std::vector<float>& data) {
  std::string head;
  if (EndsWith(path, ".npy")) {
    std::string tuple = "(";
    for (size_t i = 0; i < shape.size(); ++i) tuple += (i ? ", " : "") + std::to_string(shape[i]);
    tuple += shape.size() == 1 ? ",)" : ")";
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + tuple + ", }";
    // pad with spaces so that magic + version + length + header + '\n' is a multiple of 64
    size_t total = 10 + dict.size() + 1;
    dict.append((64 - total % 64) % 64, ' ');
    dict += '\n';
    head = std::string("\x93NUMPY\x01\x00", 8);
    head += static_cast<char>(dict.size() & 0xff);
    head += static_cast<char>((dict.size() >> 8) & 0xff);
    head += dict;
  }
  WriteFileAtomic(path, head, data.data(), data.size());
}

// ---- arguments -------------------------------------------------------------------------------
struct Options {
  std::string model, input, output;
  Shape shape;
  int top_k = 5;
  int repeat = 10;
  int threads = 0;
};

const char* kUsage =
    "usage: dsconv_run MODEL.so INPUT [--shape N,C,H,W] [--top-k K] [--repeat N] [--output FILE]\n"
    "                  [--threads T]\n"
    "  MODEL.so      a library written by `dsconv-tvm compile` for this machine\n"
    "  INPUT         .npy (float32 '<f4', C order) or raw float32 (see --shape)\n"
    "  --shape S     shape of a raw INPUT, e.g. 4,1,28,28 (default: the compiled sample shape)\n"
    "  --top-k K     classes printed per sample (default 5, 0: none)\n"
    "  --repeat N    time N calls of main on the first batch, print the median (default 10, 0: off)\n"
    "  --output FILE write all outputs: .npy if FILE ends with .npy, else raw float32\n"
    "  --threads T   TVM worker threads (default: TVM_NUM_THREADS or all cores)\n";

int ParseInt(const std::string& flag, const char* value, int lo) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || errno || v < lo || v > 1000000000)
    throw UsageError(flag + ": expected an integer >= " + std::to_string(lo) + ", got '" + value + "'");
  return static_cast<int>(v);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](void) -> const char* {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--shape") {
      std::string s = value();
      std::stringstream ss(s);
      std::string item;
      while (std::getline(ss, item, ',')) o.shape.push_back(ParseInt("--shape", item.c_str(), 1));
      if (o.shape.empty()) throw UsageError("--shape: empty shape");
    } else if (a == "--top-k" || a == "-k") {
      o.top_k = ParseInt(a, value(), 0);
    } else if (a == "--repeat" || a == "-r") {
      o.repeat = ParseInt(a, value(), 0);
    } else if (a == "--output" || a == "-o") {
      o.output = value();
    } else if (a == "--threads") {
      o.threads = ParseInt(a, value(), 1);
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a + " (see --help)");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) throw UsageError("expected MODEL.so and INPUT (see --help)");
  o.model = pos[0];
  o.input = pos[1];
  return o;
}

// ---- model -----------------------------------------------------------------------------------
int HostElfMachine() {
#if defined(__x86_64__)
  return 0x3E;
#elif defined(__aarch64__)
  return 0xB7;
#elif defined(__arm__)
  return 0x28;
#else
  return -1;
#endif
}

std::string ElfMachineName(int m) {
  switch (m) {
    case 0x3E: return "x86-64";
    case 0xB7: return "AArch64";
    case 0x28: return "ARM (32-bit)";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "ELF machine 0x%x", m);
      return buf;
    }
  }
}

void CheckLibraryFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(path + ": cannot open (" + std::strerror(errno) + ")");
  unsigned char head[20] = {0};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  if (in.gcount() < 20 || std::memcmp(head, "\x7f" "ELF", 4) != 0)
    throw UsageError(path + ": not a shared library (no ELF header)");
  int machine = head[5] == 2 ? (head[18] << 8 | head[19]) : (head[19] << 8 | head[18]);
  if (HostElfMachine() > 0 && machine != HostElfMachine())
    throw UsageError(path + ": is an " + ElfMachineName(machine) + " library; this program runs on " +
                     ElfMachineName(HostElfMachine()) + " (compile the model with a matching --target)");
}

std::string FfiMessage(const std::exception& e) {
  if (auto* fe = dynamic_cast<const ffi::Error*>(&e)) return fe->kind() + ": " + fe->message();
  return e.what();
}

struct CPUAlloc {  // allocator for ffi::Tensor::FromNDAlloc
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Module LoadLibrary(std::string path) {
  CheckLibraryFile(path);
  if (path.find('/') == std::string::npos) path = "./" + path;  // else dlopen searches LD paths
  try {
    return ffi::Module::LoadFromFile(path);
  } catch (const std::exception& e) {
    throw UsageError(path + ": cannot be loaded as a TVM library (" + FfiMessage(e) + ")");
  }
}

ffi::Module CreateVM(const ffi::Module& lib, const std::string& path) {
  auto load = lib->GetFunction("vm_load_executable");
  if (!load.has_value())
    throw UsageError(path + ": not a Relax VM library (was it written by `dsconv-tvm compile`?)");
  try {
    ffi::Module vm = load.value()().cast<ffi::Module>();
    // one (device type, device id, allocator) triple per device; allocator 2 = pooled
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    return vm;
  } catch (const std::exception& e) {
    throw RunError(path + ": cannot initialise the Relax VM (" + FfiMessage(e) + ")");
  }
}

ffi::Function GetMain(const ffi::Module& vm, const std::string& path) {
  auto fmain = vm->GetFunction("main");
  if (!fmain.has_value()) throw UsageError(path + ": has no function 'main'");
  return fmain.value();
}

struct Model {
  ffi::Module lib, vm;
  ffi::Function main;
  Shape input_shape;  // empty if the library has no dsconv_input_shapes()

  explicit Model(const std::string& path)
      : lib(LoadLibrary(path)), vm(CreateVM(lib, path)), main(GetMain(vm, path)) {
    // dsconv_input_shapes() -> a tuple with one shape per model input
    if (auto fshapes = vm->GetFunction("dsconv_input_shapes")) {
      try {
        ffi::Any shapes = fshapes.value()();
        auto arr = shapes.cast<ffi::Array<ffi::Any>>();
        if (!arr.empty()) {
          for (int64_t d : arr[0].cast<ffi::Shape>()) input_shape.push_back(d);
        }
      } catch (const std::exception& e) {
        throw RunError(path + ": dsconv_input_shapes() failed (" + FfiMessage(e) + ")");
      }
    }
  }

  // Runs main on one batch; returns the first output (float32, on the CPU).
  ffi::Tensor Run(const ffi::Tensor& x) {
    ffi::Any out;
    try {
      out = main(x);
    } catch (const std::exception& e) {
      throw RunError("main failed: " + FfiMessage(e));
    }
    if (auto t = out.as<ffi::Tensor>()) return CheckOutput(*t);
    if (auto arr = out.as<ffi::Array<ffi::Any>>()) {
      if (!arr->empty()) {
        if (auto t = (*arr)[0].as<ffi::Tensor>()) return CheckOutput(*t);
      }
    }
    throw RunError("main returned " + std::string(out.GetTypeKey()) + ", not a tensor");
  }

  static ffi::Tensor CheckOutput(ffi::Tensor t) {
    DLDataType dt = t.dtype();
    if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1)
      throw RunError("the output is not float32 (dtype code " + std::to_string(dt.code) + ", " +
                     std::to_string(dt.bits) + " bits)");
    if (t.device().device_type != kDLCPU) throw RunError("the output is not on the CPU");
    if (!t.IsContiguous()) throw RunError("the output is not contiguous");
    return t;
  }
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int Run(const Options& opt) {
  if (opt.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(opt.threads).c_str(), 1);
  if (!LittleEndianHost()) throw UsageError("this program assumes a little-endian machine");
  if (!opt.output.empty()) {  // fail before running, not after
    std::FILE* probe = std::fopen((opt.output + ".tmp").c_str(), "wb");
    if (!probe) throw UsageError("cannot write " + opt.output + ": " + std::strerror(errno));
    std::fclose(probe);
    std::remove((opt.output + ".tmp").c_str());
  }

  // input (read before loading the model: a bad file is reported without waiting for the load)
  std::vector<char> raw = ReadFile(opt.input);
  Array x;
  const bool is_npy = raw.size() >= 6 && std::memcmp(raw.data(), "\x93NUMPY", 6) == 0;
  if (is_npy) {
    if (!opt.shape.empty()) throw UsageError("--shape is for raw float32 input; " + opt.input + " is a .npy file");
    x = ParseNpy(raw, opt.input);
  } else if (EndsWith(opt.input, ".npy")) {
    throw UsageError(opt.input + ": not a .npy file (no \\x93NUMPY magic)");
  }

  Model model(opt.model);
  const Shape& cs = model.input_shape;
  if (!is_npy) {
    if (raw.size() % 4) throw UsageError(opt.input + ": size " + std::to_string(raw.size()) +
                                         " bytes is not a multiple of 4 (float32)");
    const int64_t n = static_cast<int64_t>(raw.size() / 4);
    if (!opt.shape.empty()) {
      x.shape = opt.shape;
    } else if (!cs.empty()) {  // samples of the compiled per-sample shape
      Shape sample(cs.begin() + 1, cs.end());
      int64_t per = NumElements(sample);
      if (per == 0 || n % per)
        throw UsageError(opt.input + ": " + std::to_string(n) + " floats is not a whole number of samples " +
                         ShapeStr(sample) + "; give --shape");
      x.shape = {n / per};
      x.shape.insert(x.shape.end(), sample.begin(), sample.end());
    } else {
      throw UsageError(opt.input + ": raw input needs --shape (the model does not record its input shape)");
    }
    if (NumElements(x.shape) != n)
      throw UsageError(opt.input + ": has " + std::to_string(n) + " floats, --shape " + ShapeStr(x.shape) +
                       " needs " + std::to_string(NumElements(x.shape)));
    x.data.resize(static_cast<size_t>(n));
    if (n) std::memcpy(x.data.data(), raw.data(), raw.size());
  }
  std::vector<char>().swap(raw);

  // fit the input to the compiled shape: [k*B, ...] or one sample [...]
  Shape batch_shape = cs.empty() ? x.shape : cs;
  if (!cs.empty() && x.shape.size() + 1 == cs.size() &&
      std::equal(x.shape.begin(), x.shape.end(), cs.begin() + 1))
    x.shape.insert(x.shape.begin(), 1);
  const int64_t batch = batch_shape.empty() ? 1 : batch_shape[0];
  if (x.shape.size() != batch_shape.size() || x.shape.empty() ||
      !std::equal(x.shape.begin() + 1, x.shape.end(), batch_shape.begin() + 1) || batch <= 0 ||
      x.shape[0] % batch || x.shape[0] == 0)
    throw UsageError(opt.input + ": shape " + ShapeStr(x.shape) + " does not fit the compiled input " +
                     ShapeStr(batch_shape) + " (the leading dimension must be a multiple of " +
                     std::to_string(batch) + ")");
  for (size_t i = 0; i < x.data.size(); ++i) {
    if (!std::isfinite(x.data[i]))
      throw UsageError(opt.input + ": element " + std::to_string(i) + " is " +
                       (std::isnan(x.data[i]) ? "NaN" : "infinite") + "; inputs must be finite");
  }

  const int64_t samples = x.shape[0];
  const int64_t chunk_elems = NumElements(batch_shape);
  ffi::Tensor in = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(batch_shape),
                                            DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
  float* pin = static_cast<float*>(in.data_ptr());
  std::vector<float> out;
  Shape out_shape;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < samples; s += batch) {
    std::memcpy(pin, x.data.data() + s * (chunk_elems / batch), static_cast<size_t>(chunk_elems) * 4);
    ffi::Tensor y = model.Run(in);
    Shape ys(y.shape().begin(), y.shape().end());
    if (ys.empty() || ys[0] != batch)
      throw RunError("main returned shape " + ShapeStr(ys) + ", expected a leading dimension of " +
                     std::to_string(batch));
    if (out_shape.empty()) {
      out_shape = ys;
      out_shape[0] = samples;
      out.reserve(static_cast<size_t>(NumElements(out_shape)));
    }
    const float* py = static_cast<const float*>(y.data_ptr());
    out.insert(out.end(), py, py + NumElements(ys));
  }
  const double total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  // top-k per sample
  const int64_t per_sample = NumElements(out_shape) / samples;
  const int64_t k = std::min<int64_t>(opt.top_k, per_sample);
  std::vector<int64_t> idx(static_cast<size_t>(per_sample));
  for (int64_t s = 0; k > 0 && s < samples; ++s) {
    const float* row = out.data() + s * per_sample;
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [row](int64_t a, int64_t b) { return row[a] > row[b]; });
    std::printf("sample %lld:", static_cast<long long>(s));
    for (int64_t j = 0; j < k; ++j)
      std::printf("%s%lld:%.4f", j ? "  " : " ", static_cast<long long>(idx[j]), row[idx[j]]);
    std::printf("\n");
  }
  std::printf("ran %lld samples in %lld calls of main (batch %lld) in %.3f ms\n",
              static_cast<long long>(samples), static_cast<long long>(samples / batch),
              static_cast<long long>(batch), total_ms);

  // latency: median of --repeat calls on the first batch (the runs above were the warm-up)
  if (opt.repeat > 0) {
    std::memcpy(pin, x.data.data(), static_cast<size_t>(chunk_elems) * 4);
    std::vector<double> ms;
    for (int r = 0; r < opt.repeat; ++r) {
      const auto a = std::chrono::steady_clock::now();
      model.Run(in);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
    }
    std::printf("latency: median %.3f ms, min %.3f ms, max %.3f ms over %d runs (batch %lld)\n",
                Median(ms), *std::min_element(ms.begin(), ms.end()),
                *std::max_element(ms.begin(), ms.end()), opt.repeat, static_cast<long long>(batch));
  }
  if (!opt.output.empty()) {
    WriteOutput(opt.output, out_shape, out);
    std::printf("wrote %s %s\n", opt.output.c_str(), ShapeStr(out_shape).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "dsconv_run: error: %s\n", e.what());
    return 2;
  } catch (const RunError& e) {
    std::fprintf(stderr, "dsconv_run: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsconv_run: error: %s\n", FfiMessage(e).c_str());
    return 1;
  }
}
