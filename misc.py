import numpy as np, torch, warnings
torch.set_num_threads(1)
import fastae
from sklearn.datasets import load_digits
from sklearn.semi_supervised import SelfTrainingClassifier
from sklearn.calibration import CalibratedClassifierCV
X, y = load_digits(return_X_y=True); X, y = X[:400], y[:400]
rng = np.random.RandomState(0); yp = np.where(rng.rand(400) < 0.2, y, -1)
m = fastae.SemiSupervisedAutoencoder(8, epochs=5, warm_start=True, random_state=0).fit(X, yp)
P = m.predict_proba(X); it = m.n_iter_
try: m.fit(X, np.where(np.isin(yp,[0,1]), yp, -1))
except ValueError as e: print("failed warm fit:", str(e)[:80])
print("unchanged after failed fit", np.array_equal(P, m.predict_proba(X)), m.n_iter_ == it)
s = torch.get_rng_state(); fastae.SemiSupervisedAutoencoder(8, epochs=2, random_state=0).fit(X, yp); print("torch rng untouched", torch.equal(s, torch.get_rng_state()))
st = SelfTrainingClassifier(fastae.SemiSupervisedAutoencoder(8, epochs=10, random_state=0), max_iter=3).fit(X, yp)
print("SelfTraining wrap", st.score(X, y), st.n_iter_)
cc = CalibratedClassifierCV(fastae.SemiSupervisedAutoencoder(8, epochs=5, random_state=0), cv=3).fit(X, y)
print("calibrated cv", cc.score(X, y))
for bad in (-1.0, float("nan"), "a", None):
    try: fastae.SemiSupervisedAutoencoder(8, epochs=1, reconstruction_weight=bad).fit(X, yp); print("rw", bad, "accepted")
    except Exception as e: print("rw", bad, type(e).__name__, str(e)[:100])
# reconstruction_weight=0: unlabelled rows irrelevant?
a = fastae.SemiSupervisedAutoencoder(8, epochs=5, random_state=0, reconstruction_weight=0).fit(X, yp)
print("rw=0 ok", a.score(X, y))
# float32 vs float64 predictions consistent
m2 = fastae.SemiSupervisedAutoencoder(8, epochs=10, random_state=0).fit(X, yp)
print("f32 vs f64 pred mismatches", (m2.predict(X) != m2.predict(X.astype(np.float32))).sum(), "proba diff", np.abs(m2.predict_proba(X)-m2.predict_proba(X.astype(np.float32))).max())
# one row predict vs batched
print("row alone vs batched", np.abs(m2.predict_proba(X[:1]) - m2.predict_proba(X)[:1]).max())
# feature names
print(hasattr(m2, "feature_names_in_"), m2.n_features_in_)
print("tags", m2.__sklearn_tags__().estimator_type, m2.__sklearn_tags__().classifier_tags)
