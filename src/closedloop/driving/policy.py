"""The learned longitudinal policy: gradient-boosted trees from radar features to acceleration."""

from __future__ import annotations

from closedloop.driving.dynamics import FEATURES


def train_policy(train, *, target: str = "target_accel", max_iter: int = 200, learning_rate: float = 0.1,
                 max_leaf_nodes: int = 31, random_state: int = 0):
    """Fit the policy on labelled logs; hyperparameters come from the template.

    The returned estimator is plain scikit-learn, fitted on a DataFrame, so it remembers its
    feature names (``feature_names_in_``) and MLflow can store it as an ``sklearn`` flavour.
    Actuator limits are applied by whoever drives the car with it (the simulator).
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    regressor = HistGradientBoostingRegressor(
        max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes,
        random_state=random_state,
    )
    regressor.fit(train[list(FEATURES)], train[target])
    return regressor


#: Types outside skops' default allow-list that this trainer's models contain. MLflow stores
#: sklearn models with skops and refuses types nobody vouched for; we vouch for these.
train_policy.skops_trusted_types = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]
