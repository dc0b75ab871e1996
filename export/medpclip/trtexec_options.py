"""Every option trtexec 10.11 accepts, so that the `.trtexec.sh` we write is checked here, where
no TensorRT runs (tests/test_tensorrt_static.py).

Provenance: NVIDIA/TensorRT, branch release/10.11 (the TensorRT of our NGC images,
`ngc_images.TENSORRT_IN_IMAGE`), commit 9255eb39e6642787828a4c1f7fc1d09fe004e7a2,
samples/common/sampleOptions.cpp: every option name handed as a string literal to one of the
parser's helpers together with `arguments` (`getAndDelOption(arguments, "--onnx", ...)`,
`getShapesBuild(arguments, ..., "--minShapes", ...)`, `getLayerPrecisions(arguments,
"--layerPrecisions", ...)`, `getFormats(..., "--inputIOFormats")`; 114 names, deprecated
aliases such as --plugins and --streams included, as they still parse). samples/trtexec/trtexec.cpp
fails with "Unknown option" on anything left over, so a flag outside this set stops the build.
The value vocabularies below are the maps the same file parses with (stringToValue<DataType>,
"--precisionConstraints", "--memPoolSize"). Names only, re-extracted by hand when the images move.
"""

from __future__ import annotations

TENSORRT_RELEASE = "10.11"

OPTIONS = frozenset(
    """
    --allocationStrategy --allowGPUFallback --allowWeightStreaming --asyncFileReader --avgRuns
    --avgTiming --best --bf16 --buildDLAStandalone --builderOptimizationLevel --calib
    --calibProfile --device --directIO --dumpLayerInfo --dumpOptimizationProfile --dumpOutput
    --dumpProfile --dumpRawBindingsToFile --dumpRefit --duration --dynamicPlugins
    --errorOnTimingCacheMiss --excludeLeanRuntime --exportLayerInfo --exportOutput --exportProfile
    --exportTimes --exposeDMA --fp16 --fp8 --getPlanVersionOnly --hardwareCompatibilityLevel
    --help --idleTime --ignoreParsedPluginLibs --infStreams --inputIOFormats --int4 --int8
    --iterations --l2LimitForTiling --layerDeviceTypes --layerOutputTypes --layerPrecisions
    --leanDLLPath --loadEngine --loadInputs --markDebug --maxAuxStreams --maxShapes
    --maxShapesCalib --maxTactics --memPoolSize --minShapes --minShapesCalib --monitorMemory
    --noBuilderCache --noCompilationCache --noDataTransfers --noTF32 --onnx --optShapes
    --optShapesCalib --outputIOFormats --percentile --persistentCacheRatio --pi
    --pluginInstanceNorm --plugins --precisionConstraints --preview --profile --profilingVerbosity
    --refit --restricted --runtimePlatform --safe --saveDebugTensors --saveEngine
    --separateProfileRun --serialized --setPluginsToSerialize --shapes --skipInference --sleepTime
    --sparsity --staticPlugins --std --streams --stripAllWeights --stripWeights --stronglyTyped
    --tacticSources --tempdir --tempfileControls --threads --tilingOptimizationLevel
    --timeDeserialize --timeRefit --timingCacheFile --uint8AsymmetricQuantizationDLA
    --useCudaGraph --useDLACore --useManagedMemory --useProfile --useRuntime --useSpinWait --vc
    --verbose --versionCompatible --warmUp --weightStreamingBudget --weightless
    """.split()
)

PRECISION_CONSTRAINTS = frozenset({"none", "prefer", "obey"})
DATA_TYPES = frozenset(
    {"fp32", "fp16", "bf16", "int8", "fp8", "int32", "int64", "bool", "uint8", "int4"}
)
MEMORY_POOLS = frozenset(
    {"workspace", "dlaSRAM", "dlaLocalDRAM", "dlaGlobalDRAM", "tacticSharedMem"}
)
