//! Charts (plotters): SVG and PNG with an embedded font, no system libraries.

