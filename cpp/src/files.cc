// The bundle's files on disk: bounded reads (stat before open, so a FIFO or a device is never waited
// on), sizes, each graph's external data, sha256 (OpenSSL), and read_manifest, which runs every check.
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "bundle_internal.h"

namespace moedge {
namespace detail {

std::string read_small_file(const std::string& path, const std::string& what, const std::string& fix) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0)
    throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
  if (!S_ISREG(info.st_mode)) throw Error(what + " is not a regular file: " + fix);
  if (info.st_size > kMaxJsonBytes) throw Error(what + " is larger than 64 MiB: " + fix);
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (fd.get() < 0) throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
  if (::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode)) throw Error(what + " is not a regular file: " + fix);
  std::string text;
  char block[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd.get(), block, sizeof block);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + what + " (" + std::strerror(errno) + "): " + fix);
    if (got == 0) break;
    text.append(block, static_cast<size_t>(got));
    if (static_cast<int64_t>(text.size()) > kMaxJsonBytes) throw Error(what + " is larger than 64 MiB: " + fix);
  }
  return text;
}

namespace {

// The whole of a listed graph file (a regular file by check_files' stat).
std::string read_graph_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  struct stat info {};
  if (fd.get() < 0 || ::fstat(fd.get(), &info) != 0)
    throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(info.st_mode)) throw Error("cannot read " + clip(printable(path), 300) + ": not a regular file");
  std::string data;
  data.reserve(static_cast<size_t>(info.st_size));
  char block[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd.get(), block, sizeof block);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + clip(printable(path), 300) + " (" + std::strerror(errno) + ")");
    if (got == 0) break;
    data.append(block, static_cast<size_t>(got));
  }
  return data;
}

}  // namespace
}  // namespace detail

using namespace detail;

std::string sha256_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (fd.get() < 0) throw Error("cannot read " + printable(path) + " (" + std::strerror(errno) + ")");
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode))
    throw Error("cannot read " + printable(path) + ": not a regular file");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL sha256 is unavailable");
  std::vector<char> block(1 << 20);
  for (;;) {
    const ssize_t got = ::read(fd.get(), block.data(), block.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Error("cannot read " + printable(path) + " (" + std::strerror(errno) + ")");
    if (got == 0) break;
    EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(got));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &size);
  std::string hex;
  char buf[3];
  for (unsigned int i = 0; i < size; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", digest[i]);
    hex += buf;
  }
  return hex;
}

void check_files(const std::string& bundle_dir, const Manifest& manifest, bool hashes) {
  const std::string dir = bundle_folder(bundle_dir);
  for (const auto& [rel, entry] : manifest.files) {
    struct stat info {};
    if (::stat((dir + "/" + rel).c_str(), &info) != 0)
      throw Error("bundle " + printable(dir) + " is missing " + file_name(rel) + ": copy the whole bundle folder");
    if (!S_ISREG(info.st_mode)) throw Error("bundle file " + file_name(rel) + " is not a regular file: re-copy the bundle");
    if (static_cast<int64_t>(info.st_size) != entry.bytes)
      throw Error("bundle file " + file_name(rel) + " has " + std::to_string(static_cast<int64_t>(info.st_size)) +
                  " bytes, the manifest says " + std::to_string(entry.bytes) + ": re-copy the bundle");
  }
  // What each graph makes ONNX Runtime read besides itself: listed files only (so confined, regular
  // and, with hashes, verified).
  for (const auto& [field, graph] : named_graphs(manifest)) {
    const std::string path = dir + "/" + graph->file;
    const std::string model = read_graph_file(path);
    std::vector<std::string> locations;
    try {
      locations = onnx_external_locations(model);
    } catch (const Error&) {
      throw Error(clip(printable(path), 300) +
                  " is not a readable ONNX model (malformed protobuf): re-export or re-split it");
    }
    const size_t slash = graph->file.rfind('/');
    const std::string base = slash == std::string::npos ? "" : graph->file.substr(0, slash);
    std::unordered_set<std::string> seen;
    for (const std::string& location : locations) {
      if (!seen.insert(location).second) continue;
      const bool plain = !location.empty() && location[0] != '/' && location.find('\\') == std::string::npos;
      const std::string rel = plain ? normalise(base.empty() ? location : base + "/" + location) : "";
      if (!plain || rel == ".." || rel.rfind("../", 0) == 0 || manifest.files.count(rel) == 0)
        throw Error("bundle graph " + file_name(graph->file) + " (" + field + ") reads external data " +
                    clip(repr(location), 120) + ", which is not a file listed under files: " + kResplit);
    }
  }
  if (!hashes) return;
  for (const auto& [rel, entry] : manifest.files)
    if (sha256_file(dir + "/" + rel) != entry.sha256)
      throw Error("bundle file " + file_name(rel) +
                  " does not match its sha256 in manifest.json: re-copy or re-split the bundle");
}

Manifest read_manifest(const std::string& bundle_dir, bool verify) {
  const std::string dir = bundle_folder(bundle_dir);
  const std::string path = dir + "/manifest.json";
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
    throw Error(printable(dir) + " is not a moedge bundle (no manifest.json): run `moedge split` first");
  const std::string where = printable(path);
  const Manifest m = parse_manifest(read_small_file(path, where, "not a moedge manifest"), dir, where);
  check_files(dir, m, verify);
  return m;
}

}  // namespace moedge
