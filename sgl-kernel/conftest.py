"""Test set-up of the kernel library on its own (``cd sgl-kernel && pytest``): the shared plugin, which
the repository's root conftest registers when the whole suite runs."""

PLUGIN = "sgl_hip_kernels.testing.pytest_plugin"


def pytest_configure(config):
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
