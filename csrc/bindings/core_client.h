// The Python module's side of the bridge to libbatchnorm (see core_client.cpp).
#pragma once

namespace batchnorm {
// Throws runtime_error unless the loaded libbatchnorm was built with `module_tag` (BN_BUILD_TAG);
// `module` names the calling module in the message.
void check_library_build(const char* module_tag, const char* module);
}  // namespace batchnorm
