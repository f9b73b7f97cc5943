// Stands in for torch's header when the kernels are compiled for the CPU (see ../cuda_on_cpu.h).
#pragma once
namespace at::cuda {
struct EmulatedDeviceProperties { int multiProcessorCount = 4; };
inline EmulatedDeviceProperties* getCurrentDeviceProperties() {
  static EmulatedDeviceProperties props;
  return &props;
}
}  // namespace at::cuda
