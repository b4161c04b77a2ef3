// Minimal reader for a 2-D float32 little-endian C-order .npy file (what numpy.save writes).
#pragma once
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

struct NpyMatrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;
};

inline NpyMatrix read_npy_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[6];
  f.read(magic, 6);
  if (!f || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + ": not a .npy file");
  unsigned char ver[2];
  f.read(reinterpret_cast<char*>(ver), 2);
  uint32_t header_len = 0;
  if (ver[0] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw std::runtime_error(path + ": expected dtype float32 ('<f4')");
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected C order");
  const auto open = header.find('('), close = header.find(')');
  const std::string shape = header.substr(open + 1, close - open - 1);
  const auto comma = shape.find(',');
  NpyMatrix m;
  m.rows = std::stoll(shape.substr(0, comma));
  const std::string rest = comma == std::string::npos ? "" : shape.substr(comma + 1);
  if (rest.find_first_of("0123456789") == std::string::npos) throw std::runtime_error(path + ": expected 2-D");
  m.cols = std::stoll(rest);
  m.data.resize(static_cast<size_t>(m.rows * m.cols));
  f.read(reinterpret_cast<char*>(m.data.data()), static_cast<std::streamsize>(m.data.size() * sizeof(float)));
  if (!f) throw std::runtime_error(path + ": file is shorter than its header says");
  return m;
}
