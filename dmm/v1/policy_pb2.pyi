from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferenceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INFERENCE_MODE_UNSPECIFIED: _ClassVar[InferenceMode]
    INFERENCE_MODE_WINDOW: _ClassVar[InferenceMode]
    INFERENCE_MODE_RECURRENT: _ClassVar[InferenceMode]
INFERENCE_MODE_UNSPECIFIED: InferenceMode
INFERENCE_MODE_WINDOW: InferenceMode
INFERENCE_MODE_RECURRENT: InferenceMode

class Start(_message.Message):
    __slots__ = ("model", "version", "target_return", "mode", "state_dim", "act_dim", "resume", "resumable")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_RETURN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    target_return: float
    mode: InferenceMode
    state_dim: int
    act_dim: int
    resume: EpisodeSoFar
    resumable: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., target_return: _Optional[float] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., state_dim: _Optional[int] = ..., act_dim: _Optional[int] = ..., resume: _Optional[_Union[EpisodeSoFar, _Mapping]] = ..., resumable: _Optional[bool] = ...) -> None: ...

class EpisodeSoFar(_message.Message):
    __slots__ = ("steps", "states", "actions", "rewards", "rtgs")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    RTGS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    states: _containers.RepeatedScalarFieldContainer[float]
    actions: _containers.RepeatedScalarFieldContainer[float]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    rtgs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, steps: _Optional[int] = ..., states: _Optional[_Iterable[float]] = ..., actions: _Optional[_Iterable[float]] = ..., rewards: _Optional[_Iterable[float]] = ..., rtgs: _Optional[_Iterable[float]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("state", "reward", "rtg")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    RTG_FIELD_NUMBER: _ClassVar[int]
    state: _containers.RepeatedScalarFieldContainer[float]
    reward: float
    rtg: float
    def __init__(self, state: _Optional[_Iterable[float]] = ..., reward: _Optional[float] = ..., rtg: _Optional[float] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("reward",)
    REWARD_FIELD_NUMBER: _ClassVar[int]
    reward: float
    def __init__(self, reward: _Optional[float] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("start", "step", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: Start
    step: Step
    end: End
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("model", "version", "mode", "target_return", "state_dim", "act_dim")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_RETURN_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    mode: InferenceMode
    target_return: float
    state_dim: int
    act_dim: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., mode: _Optional[_Union[InferenceMode, str]] = ..., target_return: _Optional[float] = ..., state_dim: _Optional[int] = ..., act_dim: _Optional[int] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("action", "step", "model", "version", "rtg")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RTG_FIELD_NUMBER: _ClassVar[int]
    action: _containers.RepeatedScalarFieldContainer[float]
    step: int
    model: str
    version: int
    rtg: float
    def __init__(self, action: _Optional[_Iterable[float]] = ..., step: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., rtg: _Optional[float] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("started", "action")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    action: Action
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class VectorStart(_message.Message):
    __slots__ = ("start", "episodes", "resume")
    START_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    start: Start
    episodes: int
    resume: _containers.RepeatedCompositeFieldContainer[EpisodeSoFar]
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., episodes: _Optional[int] = ..., resume: _Optional[_Iterable[_Union[EpisodeSoFar, _Mapping]]] = ...) -> None: ...

class VectorStep(_message.Message):
    __slots__ = ("rows", "states", "rewards", "restart")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[float]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    restart: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rows: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[float]] = ..., rewards: _Optional[_Iterable[float]] = ..., restart: _Optional[_Iterable[int]] = ...) -> None: ...

class VectorEnd(_message.Message):
    __slots__ = ("rows", "rewards")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[_Iterable[int]] = ..., rewards: _Optional[_Iterable[float]] = ...) -> None: ...

class VectorRequest(_message.Message):
    __slots__ = ("start", "step", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: VectorStart
    step: VectorStep
    end: VectorEnd
    def __init__(self, start: _Optional[_Union[VectorStart, _Mapping]] = ..., step: _Optional[_Union[VectorStep, _Mapping]] = ..., end: _Optional[_Union[VectorEnd, _Mapping]] = ...) -> None: ...

class VectorStarted(_message.Message):
    __slots__ = ("session", "episodes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    session: SessionStarted
    episodes: int
    def __init__(self, session: _Optional[_Union[SessionStarted, _Mapping]] = ..., episodes: _Optional[int] = ...) -> None: ...

class VectorActions(_message.Message):
    __slots__ = ("rows", "actions", "steps", "rtgs")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RTGS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    actions: _containers.RepeatedScalarFieldContainer[float]
    steps: _containers.RepeatedScalarFieldContainer[int]
    rtgs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[_Iterable[int]] = ..., actions: _Optional[_Iterable[float]] = ..., steps: _Optional[_Iterable[int]] = ..., rtgs: _Optional[_Iterable[float]] = ...) -> None: ...

class VectorResponse(_message.Message):
    __slots__ = ("started", "actions")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    started: VectorStarted
    actions: VectorActions
    def __init__(self, started: _Optional[_Union[VectorStarted, _Mapping]] = ..., actions: _Optional[_Union[VectorActions, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("name", "versions", "latest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    latest: int
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., latest: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersions]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersions, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "version", "state_dim", "act_dim", "config_json", "meta_json", "metrics_json", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACT_DIM_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state_dim: int
    act_dim: int
    config_json: str
    meta_json: str
    metrics_json: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state_dim: _Optional[int] = ..., act_dim: _Optional[int] = ..., config_json: _Optional[str] = ..., meta_json: _Optional[str] = ..., metrics_json: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...
