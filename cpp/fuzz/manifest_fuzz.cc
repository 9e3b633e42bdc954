// libFuzzer target for the bundle loader's first line of defence: manifest.json text goes through
// moedge::parse_manifest (JSON, schema, path confinement) and moedge::check_files (stat, sizes, each
// graph's external data, sha256) against a tiny bundle folder written at start-up; the same bytes also
// go through moedge::onnx_external_locations (the ONNX protobuf walker) and the rotary .npy checks, as a
// whole file and as the header dict of one. No ONNX Runtime here.
//
// Every input must end in a Manifest or in one moedge::Error with a short one-line message; a crash, a
// hang, a sanitizer report, any other exception (nlohmann's, std::out_of_range) or a bad message is a
// finding. The folder holds tiny ONNX models and files with known hashes (cpp/fuzz/corpus/valid_min.json
// lists them exactly), a FIFO, a directory and symlinks inside, outside, dangling and looping, so mutated
// paths reach each of those. MOEDGE_FUZZ_PRINT=1 prints each input's outcome (tests use it).
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <string>

#include "../src/bundle_internal.h"  // check_rotary_npy
#include "moedge/runtime.h"

namespace {

std::string g_root;    // the temporary folder
std::string g_bundle;  // g_root/bundle
bool g_print = false;

void need(bool ok, const std::string& what) {
  if (!ok) {
    std::perror(what.c_str());
    std::abort();
  }
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  need(static_cast<bool>(out), path);
}

// One length-delimited protobuf field (field numbers below 16, payloads below 128 bytes).
std::string pb(int field, const std::string& payload) {
  return std::string{static_cast<char>(field << 3 | 2), static_cast<char>(payload.size())} + payload;
}

// A ModelProto with only an ir_version (distinct per file).
std::string empty_model(char ir_version) { return std::string{'\x08', ir_version}; }

int remove_entry(const char* path, const struct stat*, int, struct FTW*) { return std::remove(path); }

void remove_root() {
  if (!g_root.empty()) ::nftw(g_root.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

void make_bundle() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/moedge-fuzz-XXXXXX";
  need(::mkdtemp(pattern.data()) != nullptr, "mkdtemp " + pattern);
  g_root = pattern;
  std::atexit(remove_root);
  g_bundle = g_root + "/bundle";
  for (const std::string& dir :
       {g_bundle, g_bundle + "/stages", g_bundle + "/experts", g_bundle + "/dir", g_root + "/outside"})
    need(::mkdir(dir.c_str(), 0700) == 0, "mkdir " + dir);
  // The files valid_min.json lists, with these contents (its sha256 and bytes are of these bytes). The
  // embedding keeps one initializer in embedding.onnx.data: model.graph(7).initializer(5).external_data(13).
  const std::string location = pb(1, "location") + pb(2, "embedding.onnx.data");
  write_file(g_bundle + "/stages/embedding.onnx", empty_model(1) + pb(7, pb(5, pb(13, location))));
  write_file(g_bundle + "/stages/embedding.onnx.data", "weights");
  write_file(g_bundle + "/stages/layer_000.onnx", empty_model(2));
  write_file(g_bundle + "/stages/layer_001.onnx", empty_model(3));
  write_file(g_bundle + "/stages/head.onnx", empty_model(4));
  write_file(g_bundle + "/stages/layer_000.router.npy", "router");
  write_file(g_bundle + "/experts/layer_000_expert_000.onnx", empty_model(5));
  write_file(g_bundle + "/experts/layer_000_expert_001.onnx", empty_model(6));
  write_file(g_bundle + "/tokenizer.json", "{}");
  // What a hostile bundle may hold instead.
  write_file(g_root + "/outside/x.onnx", "x");
  need(::mkfifo((g_bundle + "/fifo").c_str(), 0600) == 0, "mkfifo");
  need(::mkfifo((g_root + "/outside/fifo").c_str(), 0600) == 0, "mkfifo");
  need(::symlink("../stages/head.onnx", (g_bundle + "/experts/alias.onnx").c_str()) == 0, "symlink");
  need(::symlink("../outside", (g_bundle + "/out").c_str()) == 0, "symlink");
  need(::symlink("/nonexistent/moedge-fuzz/x", (g_bundle + "/dangling").c_str()) == 0, "symlink");
  need(::symlink("loop", (g_bundle + "/loop").c_str()) == 0, "symlink");
  need(::symlink("..", (g_bundle + "/up").c_str()) == 0, "symlink");
}

// One short line that starts as the loader's messages do. (Text from the manifest may appear inside
// it; a library's own exception text cannot: it would arrive as another exception type.)
bool good_message(const std::string& message) {
  if (message.empty() || message.size() > 2000) return false;
  if (message.find_first_of("\n\r") != std::string::npos) return false;
  for (const char* start : {"manifest.json: ", "manifest.json is not ", "manifest.json has schema version ",
                            "bundle file ", "bundle graph ", "bundle " /* is missing */, "cannot read ", g_bundle.c_str()})
    if (message.rfind(start, 0) == 0) return true;
  return false;
}

// The rotary .npy checks on `bytes`: they pass or end in one short line about the file.
void check_npy(const std::string& bytes) {
  try {
    moedge::detail::check_rotary_npy(bytes, "rotary_cache.npy", 16);
  } catch (const moedge::Error& e) {
    const std::string message = e.what();
    if (message.rfind("bundle file rotary_cache.npy ", 0) != 0 || message.size() > 2000 ||
        message.find_first_of("\n\r") != std::string::npos) {
      std::fprintf(stderr, "moedge-fuzz: a .npy message that is not one short clean line: %s\n", message.c_str());
      std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  make_bundle();
  const char* print = std::getenv("MOEDGE_FUZZ_PRINT");
  g_print = print != nullptr && *print != '\0' && *print != '0';
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    for (const std::string& location : moedge::onnx_external_locations(text))
      if (location.size() > size) std::abort();
  } catch (const moedge::Error& e) {
    if (std::string(e.what()) != "not a well-formed ONNX protobuf") std::abort();
  }
  check_npy(text);
  std::string as_header("\x93NUMPY\x02\x00", 8);  // the input as the dict of a format 2.0 header
  for (int shift = 0; shift < 32; shift += 8) as_header += static_cast<char>(size >> shift & 0xff);
  check_npy(as_header + text);
  try {
    const moedge::Manifest manifest = moedge::parse_manifest(text, g_bundle, "manifest.json");
    moedge::check_files(g_bundle, manifest, true);
    if (manifest.expert_bytes() < 0 || manifest.expert_bytes() > moedge::kMaxBytes) std::abort();
    if (g_print) std::fprintf(stderr, "moedge-fuzz: ok\n");
  } catch (const moedge::Error& e) {
    const std::string message = e.what();
    if (g_print) std::fprintf(stderr, "moedge-fuzz: error: %s\n", message.c_str());
    if (!good_message(message)) {
      std::fprintf(stderr, "moedge-fuzz: a message that is not one short clean line: %s\n", message.c_str());
      std::abort();
    }
  }
  // Any other exception leaves this function: libFuzzer reports it (std::terminate) as a finding.
  return 0;
}
