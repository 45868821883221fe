"""Label policy: the expert acceleration a good driver would have commanded, smoothed over time."""

from __future__ import annotations

from closedloop.driving.dynamics import IDMParams, idm_accel


def expert_acceleration(raw, *, version: str, smoothing_window: int = 5, time_headway: float = 1.4):
    """Label each logged state with the expert (IDM) acceleration, smoothed per episode.

    :param raw: drive logs as produced by the dataset generator.
    :param version: the label policy version (recorded; the parameters define the behaviour).
    :param smoothing_window: centred moving-average window, in steps (1 = no smoothing).
    :param time_headway: the expert's desired time headway in seconds.
    :return: a copy of ``raw`` with a ``target_accel`` column.
    """
    p = IDMParams(time_headway=time_headway)
    labelled = raw.copy()
    raw_label = [
        idm_accel(v, vl, g, p)
        for v, vl, g in zip(raw["ego_speed"], raw["lead_speed"], raw["gap"], strict=True)
    ]
    labelled["target_accel"] = raw_label
    if smoothing_window > 1:
        labelled["target_accel"] = (
            labelled.groupby("episode_id", sort=False)["target_accel"]
            .transform(lambda s: s.rolling(smoothing_window, center=True, min_periods=1).mean())
        )
    labelled["label_policy_version"] = str(version)
    return labelled
