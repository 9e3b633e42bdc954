// ONNX Runtime loaded at run time: dlopen the library, bind the C++ API to its function table.
// A binary linked against libonnxruntime records the exact library version; this one runs with any
// ONNX Runtime whose API is at least the headers' (ORT_API_VERSION).
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "moedge/runtime.h"
#include "onnxruntime_cxx_api.h"

#ifndef MOEDGE_DEFAULT_ORT_LIBRARY
#define MOEDGE_DEFAULT_ORT_LIBRARY "libonnxruntime.so.1"
#endif

namespace moedge {
namespace {
std::mutex g_mutex;
const OrtApiBase* g_base = nullptr;  // the handle stays open for the process: ORT must outlive every object
}  // namespace

std::string default_onnxruntime_path() {
  if (const char* env = std::getenv("MOEDGE_ORT_LIB"); env != nullptr && *env != '\0') return env;
  return MOEDGE_DEFAULT_ORT_LIBRARY;
}

void load_onnxruntime(const std::string& library_path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_base != nullptr) return;
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr && library_path == MOEDGE_DEFAULT_ORT_LIBRARY && std::getenv("MOEDGE_ORT_LIB") == nullptr)
    handle = dlopen("libonnxruntime.so.1", RTLD_NOW | RTLD_LOCAL);  // the build's SDK moved: the loader path
  if (handle == nullptr) {
    const char* why = dlerror();
    throw Error("cannot load ONNX Runtime from " + library_path + " (" + (why ? why : "unknown") +
                "): pass --ort-lib PATH or set MOEDGE_ORT_LIB to a libonnxruntime.so >= 1.29");
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (get_base == nullptr) throw Error(library_path + " is not ONNX Runtime (no OrtGetApiBase)");
  const OrtApiBase* base = get_base();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    throw Error("ONNX Runtime " + std::string(base->GetVersionString()) + " at " + library_path +
                " is older than this build's API " + std::to_string(ORT_API_VERSION) + ": use ONNX Runtime >= 1.29");
  Ort::InitApi(api);
  g_base = base;
}

std::string onnxruntime_version() {
  if (g_base == nullptr) throw Error("ONNX Runtime is not loaded: call moedge::load_onnxruntime first");
  return g_base->GetVersionString();
}

}  // namespace moedge
