// Errors raised by the core. Input problems use the standard types so that callers (and the Python
// bindings) can tell them apart: std::invalid_argument for bad values or shapes, std::out_of_range for
// ids or offsets outside their range; rec_engine::Error for anything else the engine cannot do.
#pragma once
#include <stdexcept>
#include <string>

namespace rec_engine {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace rec_engine
