"""The image labels the product writes and reads (``org.sandbox-kernel.*``), defined once.

Recipes write them (``recipe``, ``build``); the store checks the kernel command
(``Image.kernel_argv``); the provisioner reads the kernel command and display name; images
built ``from`` another inherit the interpreter labels.
"""

#: The kernel command, a JSON list of strings, one of which holds ``{connection_file}``.
LABEL_ARGV = "org.sandbox-kernel.kernel.argv"
LABEL_LANGUAGE = "org.sandbox-kernel.kernel.language"
LABEL_DISPLAY_NAME = "org.sandbox-kernel.kernel.display_name"
LABEL_INTERRUPT_MODE = "org.sandbox-kernel.kernel.interrupt_mode"
#: The image's interpreter, so that images built ``from`` it inherit it.
LABEL_PY_EXECUTABLE = "org.sandbox-kernel.python.executable"
LABEL_PY_VERSION = "org.sandbox-kernel.python.version"
LABEL_PY_ABI = "org.sandbox-kernel.python.abi"
LABEL_PY_PLATFORMS = "org.sandbox-kernel.python.platforms"
LABEL_PY_SITE_DIR = "org.sandbox-kernel.python.site_dir"
#: Set on the run dir's metadata of a kernel's container: the kernelspec it serves.
LABEL_KERNELSPEC = "org.sandbox-kernel.kernelspec"
#: Set on the product's ipykernel layer images: the path inside where its packages are.
LABEL_IPYKERNEL_LAYER = "org.sandbox-kernel.ipykernel.layer"
