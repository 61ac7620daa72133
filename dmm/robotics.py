"""D4RL's AntMaze and Kitchen tasks on gymnasium-robotics, seen through D4RL's flat observations.

A policy trained on ``antmaze-*-v2`` or ``kitchen-*-v0`` data reads flat vectors laid out as D4RL
recorded them, while gymnasium-robotics' ``AntMaze_UMaze-v4`` and ``FrankaKitchen-v1`` return dict
observations. :func:`d4rl_view` wraps those environments so that evaluation, remote rollouts and
data collection see D4RL's vectors and D4RL's task (start, goal, reward, termination) without
knowing about dicts. Imported by :func:`dmm.envs.make_env` only when it creates one of them.

AntMaze (29 values: D4RL's ``AntEnv._get_obs`` with ``expose_all_qpos``, i.e. ``qpos[:15] ++
qvel[:14]`` of the ant). ``achieved_goal`` and ``observation`` are gymnasium-robotics' keys; x and y
are shifted into D4RL's frame (see below):

=======  ==========================================  ==========================  ======================
index    D4RL meaning                                gymnasium-robotics          MuJoCo
=======  ==========================================  ==========================  ======================
0, 1     torso x, y (D4RL frame: start cell at 0)    ``achieved_goal - origin``  ``qpos[0:2] - origin``
2        torso z                                     ``observation[0]``          ``qpos[2]``
3-6      torso orientation, quaternion w, x, y, z    ``observation[1:5]``        ``qpos[3:7]``
7-14     joint angles hip_1, ankle_1, hip_2,         ``observation[5:13]``       ``qpos[7:15]``
         ankle_2, hip_3, ankle_3, hip_4, ankle_4
15-17    torso linear velocity x, y, z               ``observation[13:16]``      ``qvel[0:3]``
18-20    torso angular velocity x, y, z              ``observation[16:19]``      ``qvel[3:6]``
21-28    joint velocities, same joint order          ``observation[19:27]``      ``qvel[6:14]``
=======  ==========================================  ==========================  ======================

Frames: D4RL puts maze cell (row i, column j) at ``(4j, 4i)`` minus the start cell's position, so
the ant starts at (0, 0) and rows grow along +y; gymnasium-robotics centres the maze on the origin
and rows grow along -y. The U-maze is symmetric under flipping its rows, so D4RL's start cell (row
1) is gymnasium-robotics' row 3 and its goal cell (row 3) is row 1, and the two frames differ by a
translation only: D4RL xy = gymnasium-robotics xy - ``origin``, ``origin = (-4, -4)`` (the start
cell's centre). A mirror image would also flip the ant's orientation and legs; a translation
changes nothing else.

The AntMaze task is D4RL's evaluation of ``antmaze-umaze-v2`` and ``antmaze-umaze-diverse-v2`` (both
evaluate on ``U_MAZE_TEST``; "diverse" only changes how the data were collected):

- start: the start cell's centre plus the ant's own reset noise, U(-0.1, 0.1) on every qpos and
  N(0, 0.1²) on every qvel (D4RL's ``AntEnv.reset_model``; gymnasium's Ant has the same formula);
- goal, drawn anew every episode (D4RL's ``v2_resets``): the goal cell at (0, 8) plus U(0, 1) plus
  U(0, 0.5) on each axis (``MazeEnv.goal_sampler``), so within [0, 1.5] x [8, 9.5], mean (0.75, 8.75);
- reward 1.0 on the step the torso comes within 0.5 of the goal, and the episode terminates there
  (``GoalReachingEnv.step`` with ``eval=True``), so a return is 0 or 1, which is what the reference
  scores (0 and 1) of the ``antmaze-*`` datasets assume; otherwise 0. gymnasium-robotics' own radius
  (0.45) and reward are not used. Episodes that miss are truncated at 700 steps (D4RL's limit for
  the U-maze).

Kitchen (60 values: D4RL's ``KitchenTaskRelaxV1._get_obs`` with ``goal_concat``, i.e. ``[qp,
obj_qp, goal]``):

=======  =============================================  ======================  ==============
index    D4RL meaning                                   gymnasium-robotics      MuJoCo
=======  =============================================  ======================  ==============
0-6      arm joint angles panda0_joint1..7              ``observation[0:7]``    ``qpos[0:7]``
7, 8     gripper finger positions                       ``observation[7:9]``    ``qpos[7:9]``
9-16     burner knob angle and burner opening, for      ``observation[18:26]``  ``qpos[9:17]``
         bottom right, bottom left, top right, top left
17, 18   light switch, light joint                      ``observation[26:28]``  ``qpos[17:19]``
19       slide cabinet                                  ``observation[28]``     ``qpos[19]``
20, 21   left and right hinge cabinet doors             ``observation[29:31]``  ``qpos[20:22]``
22       microwave door                                 ``observation[31]``     ``qpos[22]``
23-29    kettle position x, y, z and quaternion         ``observation[32:39]``  ``qpos[23:30]``
         w, x, y, z
30-59    goal: entry ``30 + k`` is the goal of qpos[k]  (constant per dataset)  --
         for the dataset's four tasks, 0 elsewhere
=======  =============================================  ======================  ==============

Goal entries (D4RL's ``OBS_ELEMENT_INDICES`` and ``OBS_ELEMENT_GOALS``, shifted by 30): bottom
burner 41, 42 = (-0.88, -0.01); top burner 45, 46 = (-0.92, -0.01); light switch 47, 48 = (-0.69,
-0.05); slide cabinet 49 = 0.37; hinge cabinet 50, 51 = (0, 1.45); microwave 52 = -0.75; kettle
53-59 = (-0.23, 0.75, 1.62, 0.99, 0, 0, -0.06). gymnasium-robotics' velocities (observation 9-17
and 39-58) are not part of D4RL's vector and are dropped. gymnasium-robotics adds small uniform
noise to the positions (``robot_noise_ratio``, ``object_noise_ratio``; 0 for both gives the exact
MuJoCo state, as the tests use).

The Kitchen task is D4RL's: the dataset's four tasks (:data:`KITCHEN_TASKS`), a task is complete
when its joints are within 0.3 of the goal, the reward of a step is the number of tasks completed
at that step (each counts once), and the episode terminates when all four are done or is
truncated at 280 steps. gymnasium-robotics computes exactly this once told the tasks
(``tasks_to_complete``), so only the observation is adapted. D4RL's Kitchen *datasets* store the
running count of completed tasks instead; :func:`dmm.data.load_dataset` turns it back into
per-step rewards (paper, Appendix E).
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from dmm.errors import DMMError

ANTMAZE_ID = "AntMaze_UMaze-v4"
KITCHEN_ID = "FrankaKitchen-v1"

# ---------------------------------------------------------------------------------------- AntMaze

ANTMAZE_OBS_DIM = 29
# D4RL's start (R) and goal (G) cells of U_MAZE_TEST, in gymnasium-robotics' row numbering.
ANTMAZE_START_CELL = (3, 1)
ANTMAZE_GOAL_CELL = (1, 1)
ANTMAZE_GOAL = np.array([0.0, 8.0])  # the goal cell in D4RL's frame, before D4RL's goal noise
ANTMAZE_SUCCESS_RADIUS = 0.5
ANT_RESET_NOISE = 0.1
_MAZE_SCALING = 4.0


def antmaze_goal(rng: np.random.Generator) -> np.ndarray:
    """A goal as D4RL's ``goal_sampler`` draws it (D4RL frame): the goal cell, plus
    U(0, scaling/4) from ``_rowcol_to_xy(add_random_noise=True)``, plus U(0, 0.5) * scaling/4.
    (D4RL then clips at 0, which never binds here: the noise is positive.)"""
    cell_noise = rng.uniform(0.0, 0.25 * _MAZE_SCALING, size=2)
    extra_noise = rng.uniform(0.0, 0.5, size=2) * 0.25 * _MAZE_SCALING
    return ANTMAZE_GOAL + cell_noise + extra_noise


def antmaze_success(xy: np.ndarray, goal: np.ndarray) -> bool:
    """D4RL's success test: the torso within 0.5 of the goal (both in the same frame)."""
    return bool(np.linalg.norm(np.asarray(xy) - np.asarray(goal)) <= ANTMAZE_SUCCESS_RADIUS)


class D4RLAntMaze(gymnasium.Wrapper):
    """``AntMaze_UMaze-v4`` with D4RL's flat 29-value observation and D4RL's evaluation task.

    ``goal`` is the current episode's goal in D4RL's frame. Reset ``options`` are not used: every
    episode starts and ends as D4RL's do (module docstring).
    """

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        maze = env.unwrapped
        # D4RL's start has no cell noise and its goal noise is its own (antmaze_goal); the ant's
        # reset noise is D4RL's, which gymnasium-robotics sets to 0 for its maze tasks.
        maze.position_noise_range = 0.0
        maze.ant_env._reset_noise_scale = ANT_RESET_NOISE
        self.origin = maze.maze.cell_rowcol_to_xy(np.array(ANTMAZE_START_CELL))
        self.goal = ANTMAZE_GOAL.copy()
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(ANTMAZE_OBS_DIM,), dtype=np.float64)

    def flat(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """D4RL's 29 values from gymnasium-robotics' dict (module docstring, first table)."""
        return np.concatenate([obs["achieved_goal"] - self.origin, obs["observation"]])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        cells = {"reset_cell": np.array(ANTMAZE_START_CELL), "goal_cell": np.array(ANTMAZE_GOAL_CELL)}
        obs, info = self.env.reset(seed=seed, options=cells)
        maze = self.env.unwrapped
        self.goal = antmaze_goal(maze.np_random)
        maze.goal = self.goal + self.origin  # the env's goal site and info follow D4RL's goal
        maze.update_target_site_pos()
        flat = self.flat(obs)
        info["success"] = antmaze_success(flat[:2], self.goal)
        return flat, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, _reward, terminated, truncated, info = self.env.step(action)
        flat = self.flat(obs)
        success = antmaze_success(flat[:2], self.goal)
        info["success"] = success
        return flat, float(success), bool(terminated) or success, truncated, info


# ---------------------------------------------------------------------------------------- Kitchen

KITCHEN_OBS_DIM = 60
KITCHEN_QPOS_DIM = 30  # 9 robot joints and 21 object joint positions: also the goal's length
# D4RL's kitchen_envs.py: the qpos entries of each task and their goal values.
KITCHEN_TASK_INDICES: dict[str, tuple[int, ...]] = {
    "bottom burner": (11, 12),
    "top burner": (15, 16),
    "light switch": (17, 18),
    "slide cabinet": (19,),
    "hinge cabinet": (20, 21),
    "microwave": (22,),
    "kettle": (23, 24, 25, 26, 27, 28, 29),
}
KITCHEN_TASK_GOALS: dict[str, tuple[float, ...]] = {
    "bottom burner": (-0.88, -0.01),
    "top burner": (-0.92, -0.01),
    "light switch": (-0.69, -0.05),
    "slide cabinet": (0.37,),
    "hinge cabinet": (0.0, 1.45),
    "microwave": (-0.75,),
    "kettle": (-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06),
}
# The four tasks each Kitchen dataset was recorded on (D4RL's kitchen_envs.py:
# KitchenMicrowaveKettleLightSliderV0 and KitchenMicrowaveKettleBottomBurnerLightV0).
KITCHEN_TASKS: dict[str, tuple[str, ...]] = {
    "kitchen-complete-v0": ("microwave", "kettle", "light switch", "slide cabinet"),
    "kitchen-partial-v0": ("microwave", "kettle", "light switch", "slide cabinet"),
    "kitchen-mixed-v0": ("microwave", "kettle", "bottom burner", "light switch"),
}
KITCHEN_REFERENCE_DATASET = "kitchen-mixed-v0"  # the family's reference (dmm.envs): 4 tasks
_KITCHEN_KIND = re.compile(r"^kitchen[-_](complete|partial|mixed)(?:[-_]|$)", re.IGNORECASE)
# gymnasium-robotics' 59-value observation: robot qpos 0-8, robot qvel 9-17, object qpos 18-38,
# object qvel 39-58.
_ROBOT_QPOS = slice(0, 9)
_OBJECT_QPOS = slice(18, 39)


def kitchen_tasks(dataset: str) -> tuple[str, ...]:
    """The four tasks of a Kitchen dataset name.

    D4RL's names map to their own tasks; locally named data of a D4RL kind
    (``kitchen-partial-sim-v0``) to that kind's; any other name (``FrankaKitchen-v1``) to the
    family's reference dataset's, whose reference scores it is normalized with.
    """
    if dataset in KITCHEN_TASKS:
        return KITCHEN_TASKS[dataset]
    match = _KITCHEN_KIND.match(dataset)
    kind = f"kitchen-{match.group(1).lower()}-v0" if match else KITCHEN_REFERENCE_DATASET
    return KITCHEN_TASKS[kind]


def kitchen_goal(tasks: tuple[str, ...] | list[str]) -> np.ndarray:
    """D4RL's 30-value goal (``KitchenBase._get_task_goal``): each task's goal at its qpos entries."""
    goal = np.zeros(KITCHEN_QPOS_DIM)
    for task in tasks:
        goal[list(KITCHEN_TASK_INDICES[task])] = KITCHEN_TASK_GOALS[task]
    return goal


class D4RLKitchen(gymnasium.ObservationWrapper):
    """``FrankaKitchen-v1`` with D4RL's flat 60-value observation; ``tasks`` are the env's own."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self.tasks = tuple(env.unwrapped.goal)  # the tasks the env rewards, in the order given
        self.goal = kitchen_goal(self.tasks)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(KITCHEN_OBS_DIM,), dtype=np.float64)

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        """D4RL's 60 values from gymnasium-robotics' dict (module docstring, second table)."""
        state = observation["observation"]
        return np.concatenate([state[_ROBOT_QPOS], state[_OBJECT_QPOS], self.goal])


# ---------------------------------------------------------------------------------------- both


def make_kwargs(env_id: str, dataset: str) -> dict[str, Any]:
    """``gymnasium.make`` arguments for a dataset's environment.

    Kitchen is told which tasks reward. gymnasium's passive checker is off: it only warns that
    FrankaKitchen-v1 hands out its goal dict twice, which :func:`d4rl_view` never passes on.
    """
    kwargs: dict[str, Any] = {"disable_env_checker": True}
    if env_id == KITCHEN_ID:
        kwargs["tasks_to_complete"] = list(kitchen_tasks(dataset))
    return kwargs


def d4rl_view(env: gymnasium.Env) -> gymnasium.Env:
    """``env`` (an AntMaze_UMaze-v4 or FrankaKitchen-v1 from ``gymnasium.make``) as D4RL saw it.

    Other versions are refused: their observations differ (AntMaze-v5's ant adds contact forces)
    and the layouts above are checked for these two only.
    """
    wrappers = {ANTMAZE_ID: D4RLAntMaze, KITCHEN_ID: D4RLKitchen}
    if env.spec is None or env.spec.id not in wrappers:
        found = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        env.close()
        raise DMMError(f"D4RL's observation layouts are mapped for {' and '.join(wrappers)}, not {found}")
    return wrappers[env.spec.id](env)
