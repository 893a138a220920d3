// Decoding PNG (libpng) and JPEG (libjpeg-turbo) files to 8-bit RGB, as Pillow's convert("RGB") does.
#pragma once

#include <string>

#include "resample.h"

namespace prtool {

// Decode a PNG or JPEG file (by its signature, not its name) to 8-bit RGB: alpha dropped, gray
// replicated, palettes expanded, 16-bit samples reduced to their high byte; no gamma, colour
// profile or EXIF orientation applied (Pillow applies none of them either). Throws on failure.
Rgb8 read_image(const std::string& path);

}  // namespace prtool
