"""The embedded models, shipped as package data: `stdlib-tiny/` (dense) and `stdlib-tiny-elastic/` (elastic).

The two folders stay siblings: stdlib-tiny-elastic/elastic.json finds its base weights as
`../stdlib-tiny/model.safetensors`. `sparsedial.paths` finds them through this package, in a source tree or
in an installed wheel.
"""
