// Where the paths a manifest names may lead: normalised relative paths, symlinks resolved as Python's
// os.path.realpath does, confinement to the bundle folder.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "bundle_internal.h"

namespace moedge::detail {

bool normalised_relative(const std::string& path) {
  if (path.empty() || path[0] == '/' || path.find('\\') != std::string::npos ||
      path.find('\0') != std::string::npos)
    return false;
  size_t start = 0;
  for (;;) {
    const size_t end = path.find('/', start);
    const std::string_view part(path.data() + start, (end == std::string::npos ? path.size() : end) - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (end == std::string::npos) return true;
    start = end + 1;
  }
}

std::string real_path(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> resolved(::realpath(path.c_str(), nullptr), &std::free);
  return resolved ? std::string(resolved.get()) : std::string();
}

std::string resolve_inside(const std::string& root, const std::string& rel) {
  std::vector<std::string> pending;  // parts still to walk, the next one last
  const auto push_parts = [&pending](const std::string& path) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (;;) {
      const size_t end = path.find('/', start);
      parts.push_back(path.substr(start, end == std::string::npos ? std::string::npos : end - start));
      if (end == std::string::npos) break;
      start = end + 1;
    }
    pending.insert(pending.end(), parts.rbegin(), parts.rend());
  };
  push_parts(rel);
  std::string path = root;
  int links = 0;
  while (!pending.empty()) {
    const std::string part = std::move(pending.back());
    pending.pop_back();
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      path.resize(std::max<size_t>(path.rfind('/'), 1));  // "/a/b" -> "/a", "/a" -> "/"
      continue;
    }
    const std::string next = path == "/" ? "/" + part : path + "/" + part;
    struct stat info {};
    if (::lstat(next.c_str(), &info) != 0 || !S_ISLNK(info.st_mode)) {
      path = next;
      continue;
    }
    if (++links > 40) {  // a loop: the rest stays as written
      path = next;
      for (auto it = pending.rbegin(); it != pending.rend(); ++it) path += "/" + *it;
      return path;
    }
    std::string target(4096, '\0');
    const ssize_t size = ::readlink(next.c_str(), target.data(), target.size());
    if (size <= 0 || static_cast<size_t>(size) >= target.size()) {
      path = next;
      continue;
    }
    target.resize(static_cast<size_t>(size));
    if (target[0] == '/') path = "/";
    push_parts(target);
  }
  return path;
}

bool lies_inside(const std::string& root, const std::string& target) {
  if (root == "/" || target == root) return true;
  return target.size() > root.size() && target.compare(0, root.size(), root) == 0 && target[root.size()] == '/';
}

std::string normalise(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t end = path.find('/', start);
    const std::string part = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (part == "..") {
      if (!parts.empty() && parts.back() != "..") {
        parts.pop_back();
      } else {
        parts.push_back(part);
      }
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    if (end == std::string::npos) break;
    start = end + 1;
  }
  std::string out;
  for (const auto& part : parts) out += (out.empty() ? "" : "/") + part;
  return out.empty() ? "." : out;
}

std::string bundle_folder(const std::string& bundle_dir) {
  std::string dir = bundle_dir.empty() ? "." : bundle_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

}  // namespace moedge::detail
